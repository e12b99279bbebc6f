# syntax=docker/dockerfile:1
# Palisade container image: built with the Rust toolchain, run from a small
# Debian image as an unprivileged user.
#   docker build -t palisade:0.1.0 .
#   docker run -p 8080:8080 palisade:0.1.0 run --config /etc/palisade/palisade.toml --upstream http://app:3000
# docker stop waits 10 s before it kills; the drain needs 15 s by default
# (docs/operations.md#stopping-without-dropping-requests): add --stop-timeout 30.
# The kernel defense ([syn]: SYN capture, nftables/iptables bans, XDP) needs
# NET_ADMIN, NET_RAW and BPF and the host network:
#   docker run --network host --user 0 --cap-drop ALL \
#     --cap-add NET_ADMIN --cap-add NET_RAW --cap-add BPF --cap-add NET_BIND_SERVICE ...
# (deploy/k8s/edge does the same). As the unprivileged user below Palisade
# detects from the kernel's counters only and says so.

# Pinned: the toolchain the workspace declares (rust-version) on Debian 12.
FROM rust:1.95.0-bookworm AS toolchain
# clang + libbpf-dev compile the XDP program into the binary.
RUN apt-get update && apt-get install -y --no-install-recommends clang libbpf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# The workspace's manifests with empty sources: what the dependency layer
# below is keyed on, so it is rebuilt only when a Cargo.toml or Cargo.lock
# changes, not on every source edit.
FROM toolchain AS skeleton
COPY . /full
RUN cd /full && cp Cargo.toml Cargo.lock /src/ \
    && for c in crates/*/; do \
         mkdir -p "/src/$c/src" && cp "$c/Cargo.toml" "/src/$c" && touch "/src/$c/src/lib.rs"; \
         for b in "$c"benches/*.rs; do [ -e "$b" ] && mkdir -p "/src/$c/benches" && echo 'fn main() {}' > "/src/$b"; done; \
       done \
    && echo 'fn main() {}' > /src/crates/palisade-cli/src/main.rs

FROM toolchain AS build
COPY --from=skeleton /src /src
RUN cargo build --release --locked -p palisade-cli
COPY . .
# Newer than the stubs' build, whatever times the build context carries.
RUN find crates -name '*.rs' -exec touch {} + \
    && cargo build --release --locked -p palisade-cli

FROM debian:12.11-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="palisade" \
      org.opencontainers.image.description="Anti-DDoS reverse proxy: per-client rate limits, IP reputation, slow-client and SYN-flood defense" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/palisade-rs/palisade" \
      org.opencontainers.image.documentation="https://github.com/palisade-rs/palisade/blob/main/docs/operations.md" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
# nftables (and iptables + ipset as the fallback) for kernel bans.
RUN apt-get update && apt-get install -y --no-install-recommends nftables iptables ipset \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home palisade \
    && install -d -o 10001 -g 10001 /var/lib/palisade
COPY --from=build /src/target/release/palisade /usr/local/bin/palisade
COPY deploy/docker/palisade.toml /etc/palisade/palisade.toml
USER 10001
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/palisade", "health", "--admin", "127.0.0.1:9090"]
ENTRYPOINT ["/usr/local/bin/palisade"]
CMD ["run", "--config", "/etc/palisade/palisade.toml"]
