# sluice in a container: built from source, run as an unprivileged user.
FROM rust:1-bookworm AS build
WORKDIR /src
# .git stays out of the context: pass the commit for `sluice --version`,
# as --build-arg SLUICE_GIT_COMMIT=$(git rev-parse --short=12 HEAD).
ARG SLUICE_GIT_COMMIT=unknown
COPY . .
RUN cargo build --release --locked && strip target/release/sluice

FROM debian:bookworm-slim
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
USER nobody
EXPOSE 8080 9000
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["run", "--config", "/etc/sluice/sluice.toml"]
