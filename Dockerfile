# Palisade container image: build with the Rust toolchain, run from a small
# Debian image as an unprivileged user.
#   docker build -t palisade .
#   docker run -p 8080:8080 -v $PWD/palisade.toml:/etc/palisade/palisade.toml palisade
# The kernel defense ([syn]: SYN capture, nftables/iptables bans, XDP)
# needs root with NET_ADMIN, NET_RAW and BPF (the edge DaemonSet); as the
# unprivileged user below Palisade detects from the kernel's counters only
# and says so. The proxy alone needs none of them.
FROM rust:1-bookworm AS build
# clang + libbpf-dev compile the XDP program into the binary.
RUN apt-get update && apt-get install -y --no-install-recommends clang libbpf-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p palisade-cli

FROM debian:bookworm-slim
# nftables (and iptables + ipset as the fallback) for kernel bans.
RUN apt-get update && apt-get install -y --no-install-recommends nftables iptables ipset \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home palisade
COPY --from=build /src/target/release/palisade /usr/local/bin/palisade
USER 10001
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/palisade"]
CMD ["run", "--config", "/etc/palisade/palisade.toml"]
