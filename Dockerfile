# sluice in a container: a static (musl) binary built from source, in an
# image that holds nothing else, run as an unprivileged user.
#
#   docker build --build-arg SLUICE_GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t sluice .
FROM rust:1-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl
WORKDIR /src

# Dependencies first, in a layer of their own: it is rebuilt only when
# Cargo.toml or Cargo.lock changes, so editing src/ rebuilds sluice alone.
COPY Cargo.toml Cargo.lock build.rs README.md ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --target x86_64-unknown-linux-musl \
 && rm -rf src

COPY src src
COPY config config
# .git stays out of the context, so the commit for `sluice --version`
# comes in as an argument; declared here so that it never invalidates
# the dependency layer.
ARG SLUICE_GIT_COMMIT=unknown
# touch: the stub's build is newer than the copied sources, and cargo
# would take it as up to date.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --target x86_64-unknown-linux-musl \
 && strip target/x86_64-unknown-linux-musl/release/sluice

FROM scratch
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/sluice /sluice
# nobody:nogroup, by number: the image has no /etc/passwd.
USER 65534:65534
EXPOSE 8080 9000
# `ctl health` reads /healthz and fails unless sluice takes clients; the
# config sets [admin] open_healthz = true, so it needs no token.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/sluice", "ctl", "--admin", "127.0.0.1:9000", "health"]
ENTRYPOINT ["/sluice"]
CMD ["run", "--config", "/etc/sluice/sluice.toml"]
