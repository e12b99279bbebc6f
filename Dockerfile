# Palisade container image: build with the Rust toolchain, run from a small
# Debian image as an unprivileged user.
#   docker build -t palisade .
#   docker run -p 8080:8080 -v $PWD/palisade.toml:/etc/palisade/palisade.toml palisade
# The kernel defense (SYN-flood detection, nftables, XDP; later releases)
# needs NET_ADMIN, NET_RAW and BPF capabilities and root; the proxy alone
# needs none of them.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p palisade-cli

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home palisade
COPY --from=build /src/target/release/palisade /usr/local/bin/palisade
USER 10001
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/palisade"]
CMD ["run", "--config", "/etc/palisade/palisade.toml"]
