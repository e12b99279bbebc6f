// SPDX-License-Identifier: MIT OR Apache-2.0
// Palisade's XDP program: drop packets from banned sources before
// the kernel allocates anything for them, and count SYNs per source so user
// space can judge floods without a capture socket.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct lpm4 {
	__u32 prefixlen;
	__u32 addr;
};

struct lpm6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Bans: longest-prefix match, so /64 (IPv6) and CIDR bans work. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1 << 20);
	__type(key, struct lpm4);
	__type(value, __u32);
} ban4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1 << 20);
	__type(key, struct lpm6);
	__type(value, __u32);
} ban6 SEC(".maps");

/* The listener ports a ban protects (TCP destination port, network byte
 * order). A banned source's other traffic passes: a spoofer can aim a ban
 * at an address the host itself talks to. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u16);
	__type(value, __u8);
} ports SEC(".maps");

/* SYNs per source (IPv4 as ::ffff:a.b.c.d), bounded by LRU eviction. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, __u8[16]);
	__type(value, __u64);
} syns SEC(".maps");

/* Handshakes in flight: (source, source port) -> the client's ISN. */
struct flow {
	__u8 src[16];
	__u16 sport;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1 << 17);
	__type(key, struct flow);
	__type(value, __u32);
} flows SEC(".maps");

/* Per source: handshakes never completed, and SYNs sent again. */
struct src_stat {
	__s64 half_open;
	__u64 retrans;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, __u8[16]);
	__type(value, struct src_stat);
} sources SEC(".maps");

/* 0: packets seen, 1: dropped (banned), 2: SYNs. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 i)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &i);
	if (v)
		*v += 1;
}

static __always_inline int tcp_syn(struct tcphdr *tcp, void *end)
{
	if ((void *)(tcp + 1) > end)
		return 0;
	return tcp->syn && !tcp->ack;
}

/* A SYN opens a flow (or repeats one: a retransmit); the client's ACK
 * closes it. What stays open is half-open. */
static __always_inline void track(__u8 key[16], struct tcphdr *tcp)
{
	struct flow f = { .sport = tcp->source };
	__builtin_memcpy(f.src, key, 16);
	struct src_stat *st = bpf_map_lookup_elem(&sources, key);
	if (!st) {
		struct src_stat zero = {};
		bpf_map_update_elem(&sources, key, &zero, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&sources, key);
		if (!st)
			return;
	}
	__u32 seq = tcp->seq;
	if (tcp->syn && !tcp->ack) {
		__u32 *known = bpf_map_lookup_elem(&flows, &f);
		if (known && *known == seq) {
			__sync_fetch_and_add(&st->retrans, 1);
		} else {
			bpf_map_update_elem(&flows, &f, &seq, BPF_ANY);
			if (!known)
				__sync_fetch_and_add(&st->half_open, 1);
		}
	}
}

static __always_inline void complete(__u8 key[16], struct tcphdr *tcp)
{
	struct flow f = { .sport = tcp->source };
	__builtin_memcpy(f.src, key, 16);
	if (bpf_map_delete_elem(&flows, &f) == 0) {
		struct src_stat *st = bpf_map_lookup_elem(&sources, key);
		if (st)
			__sync_fetch_and_add(&st->half_open, -1);
	}
}

static __always_inline void count_syn(__u8 key[16])
{
	__u64 one = 1;
	__u64 *v = bpf_map_lookup_elem(&syns, key);
	if (v)
		*v += 1;
	else
		bpf_map_update_elem(&syns, key, &one, BPF_ANY);
	count(2);
}

SEC("xdp")
int palisade_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	count(0);
	__u8 key[16] = {};
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return XDP_PASS;
		if (ip->protocol == IPPROTO_TCP && !(ip->frag_off & bpf_htons(0x1fff))) {
			/* Only option-less headers: adding a variable offset to
			 * a packet pointer is refused by the verifier unless the
			 * loader has CAP_PERFMON (its Spectre hardening), and the
			 * daemon runs with CAP_BPF and CAP_NET_ADMIN only. SYNs
			 * with IP options are rare and still counted by the
			 * capture socket, and a banned source's are dropped by
			 * the nftables/iptables rule behind us. */
			if (ip->ihl != 5)
				return XDP_PASS;
			struct tcphdr *tcp = (void *)(ip + 1);
			if ((void *)(tcp + 1) > end)
				return XDP_PASS;
			struct lpm4 k = { .prefixlen = 32, .addr = ip->saddr };
			if (bpf_map_lookup_elem(&ports, &tcp->dest) && bpf_map_lookup_elem(&ban4, &k)) {
				count(1);
				return XDP_DROP;
			}
			key[10] = 0xff;
			key[11] = 0xff;
			__builtin_memcpy(&key[12], &ip->saddr, 4);
			if (tcp_syn(tcp, end)) {
				count_syn(key);
				track(key, tcp);
			} else if (tcp->ack && !tcp->syn && !tcp->rst) {
				complete(key, tcp);
			}
		}
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return XDP_PASS;
		if (ip6->nexthdr == IPPROTO_TCP) {
			struct tcphdr *tcp = (void *)(ip6 + 1);
			if ((void *)(tcp + 1) > end)
				return XDP_PASS;
			struct lpm6 k = { .prefixlen = 128 };
			__builtin_memcpy(k.addr, &ip6->saddr, 16);
			if (bpf_map_lookup_elem(&ports, &tcp->dest) && bpf_map_lookup_elem(&ban6, &k)) {
				count(1);
				return XDP_DROP;
			}
			__builtin_memcpy(key, &ip6->saddr, 16);
			if (tcp_syn(tcp, end)) {
				count_syn(key);
				track(key, tcp);
			} else if (tcp->ack && !tcp->syn && !tcp->rst) {
				complete(key, tcp);
			}
		}
	}
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
