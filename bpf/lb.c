//go:build ignore

/*
 * North-south load balancer, SNAT mode: tc programs for NodePort, ExternalIP
 * and LoadBalancer frontends (scope 1 entries of kpr_svc_v1).
 *
 * tc_nodeport runs at ingress of the devices clients reach the node on. A
 * TCP or UDP packet to a frontend is sent to a backend with both ends
 * rewritten: destination := backend, source := this node's address and a
 * port from kpr's SNAT range, so the backend's reply comes back through this
 * node. tc_nodeport_reply runs at ingress of the devices those replies
 * arrive on and reverses the translation from the reverse NAT entry.
 *
 * Both programs answer "not mine" with TC_ACT_UNSPEC: with tcx that is
 * TCX_NEXT (the next program on the hook runs; after the last one the packet
 * passes), so they can share a device with each other and with a CNI's
 * programs. Malformed packets, fragments and IPv6 with extension headers are
 * never touched: the stack deals with them as if kpr were not there.
 *
 * The map schema (v1) is documented in docs/ARCHITECTURE.md.
 */

#include <linux/bpf.h>
#include <bpf_helpers.h>
#include <bpf_endian.h>

#include "lb_maps.h"

/* Not taken from pkt_cls.h, if_ether.h, socket.h: no host headers. */
#define TC_ACT_UNSPEC (-1)
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define TC_ACT_REDIRECT 7

#define VERDICT_NOT_MINE TC_ACT_UNSPEC

#define ETH_HLEN 14
#define ETH_ALEN 6
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define AF_INET 2
#define AF_INET6 10

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

#define IPPROTO_ICMP 1
#define IPPROTO_ICMPV6 58

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define NSEC_PER_SEC 1000000000ULL

/* Default sizes; the loader overrides max_entries from its Config. */
#define CT_MAP_SIZE 131072
#define MAGLEV_MAP_SIZE 65536
#define MAGLEV_TABLE_SIZE 16381

/* How many SNAT ports a new flow tries before it is dropped. */
#define SNAT_PROBES 32

/* Headers, declared here rather than taken from linux/ip.h and friends. */
struct eth_hdr {
	__u8 dst[ETH_ALEN];
	__u8 src[ETH_ALEN];
	__be16 proto;
};

struct ip4_hdr {
	__u8 ver_ihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__sum16 check;
	__be32 saddr;
	__be32 daddr;
};

struct ip6_hdr {
	__be32 ver_tc_flow;
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u32 saddr[4];
	__u32 daddr[4];
};

/* The first bytes of TCP and UDP headers: both start with the ports. */
struct tcp_hdr {
	__be16 sport;
	__be16 dport;
	__be32 seq;
	__be32 ack_seq;
	__u8 doff_res; /* data offset in the high nibble */
	__u8 flags;
	__be16 window;
	__sum16 check;
	__be16 urg_ptr;
};

struct udp_hdr {
	__be16 sport;
	__be16 dport;
	__be16 len;
	__sum16 check;
};

#define IP4_CSUM_OFF 10
#define IP4_TTL_OFF 8
#define IP4_ADDRS_OFF 12
#define IP6_HOP_OFF 7
#define IP6_ADDRS_OFF 8
#define TCP_CSUM_OFF 16
#define UDP_CSUM_OFF 6

/*
 * Direct server return: the frontend a client sent to, carried to the
 * backend's node in the flow's first packet (TCP: each SYN; UDP: each
 * datagram). Option types are RFC 4727's experimental values: the IPv4 option
 * 158 (copied into fragments, class 0, number 30), the IPv6 destination
 * option 0x1e (an unknown one is skipped: the pod's stack ignores it).
 */
#define IPPROTO_DSTOPTS 60
#define DSR_OPT4_TYPE 158
#define DSR_OPT6_TYPE 0x1e
#define DSR_OPT6_HDRLEN 2   /* (2 + 1) * 8 = 24 bytes */
#define DSR_OPT6_DATALEN 20 /* addr, port, 2 reserved */
#define IP4_MAX_HLEN 60

struct dsr_opt4 {
	__u8 type;
	__u8 len; /* 8 */
	__be16 port;
	__be32 addr;
};

/* A whole destination options header holding one option. */
struct dsr_opt6 {
	__u8 nexthdr;
	__u8 hdrlen;
	__u8 type;
	__u8 len;
	__u32 addr[4];
	__be16 port;
	__u16 reserved;
};

/*
 * A flow as one direction of it looks on the wire. The forward conntrack
 * entry is keyed by a client's packet (client -> frontend), the reverse NAT
 * entry by a backend's reply (backend -> node's SNAT address and port).
 * Addresses are 16 bytes, IPv4 IPv4-mapped, as everywhere else.
 */
struct flow_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/*
 * Flow state, for the idle timeouts. Each program writes only the entry of
 * its own direction; a flow's state is the union of both entries' flags.
 */
#define CT_F_RST 1         /* either entry: a RST was seen */
#define CT_F_FIN_CLIENT 2  /* forward entry: the client sent FIN */
#define CT_F_FIN_BACKEND 4 /* reverse entry: the backend sent FIN */
#define CT_F_REPLIED 8     /* reverse entry: the backend answered */

/* Forward entry: where a client's flow goes. */
struct ct_value {
	__u8 backend_addr[16];
	__u8 snat_addr[16];
	__be16 backend_port;
	__be16 snat_port;
	__u32 backend_id;
	__u32 svc_id;
	__u32 last_seen; /* seconds of CLOCK_MONOTONIC */
	__u16 flags;
	__u16 pad;
};

/* Reverse entry: whom a backend's reply belongs to. */
struct snat_value {
	__u8 client_addr[16];
	__u8 vip_addr[16];
	__be16 client_port;
	__be16 vip_port;
	__u32 last_seen; /* seconds of CLOCK_MONOTONIC */
	__u16 flags;
	__u16 pad;
};

/*
 * Written by the agent (entry 0). A zero snat_port_min means "not configured
 * yet": frontends are then left alone.
 */
struct lb_config {
	__u8 addr4[16]; /* SNAT source for IPv4, IPv4-mapped; all zero: none */
	__u8 addr6[16]; /* SNAT source for IPv6; all zero: none */
	__u16 snat_port_min; /* host order, inclusive */
	__u16 snat_port_max;
	__u32 maglev_size;   /* entries of every Maglev table */
	__u32 hash_seed;     /* flow hash seed, the same on every node */
	__u32 tcp_timeout_sec;       /* the backend answered */
	__u32 tcp_syn_timeout_sec;   /* no reply yet */
	__u32 tcp_close_timeout_sec; /* RST, or FIN from both ends */
	__u32 udp_timeout_sec;
};

/* Counters of kpr_lb_stats_v1; bpf2go gives the Go side these names. */
enum lb_stat {
	STAT_NEW_FLOW,
	STAT_FWD,
	STAT_REPLY,
	STAT_DROP_NO_BACKEND,
	STAT_DROP_NOT_SERVED,
	STAT_DROP_NO_SNAT_PORT,
	STAT_DROP_NO_NODE_ADDR,
	STAT_DROP_TTL,
	STAT_DROP_ERROR,
	STAT_PASS_FRAGMENT,
	STAT_PASS_MALFORMED,
	STAT_PASS_FIB,
	STAT_REJECT,
	STAT_DROP_SOURCE_RANGE,
	STAT_ECHO_REPLY,
	STAT_ICMP_ERROR,
	STAT_RATE_LIMITED,
	STAT_TOO_BIG,
	STAT_TTL_EXCEEDED,
	STAT_DSR_LEARNED,
	STAT_DROP_DSR_NO_ROOM,
	STAT_XDP_TX,
	STAT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct flow_key);
	__type(value, struct ct_value);
	__uint(max_entries, CT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_lb_ct_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct flow_key);
	__type(value, struct snat_value);
	__uint(max_entries, CT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_lb_snat_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_lb_config_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, enum lb_stat);
	__type(value, __u64);
	__uint(max_entries, STAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_lb_stats_v1 SEC(".maps");

/*
 * loadBalancerSourceRanges: the client prefixes each frontend with
 * SVC_F_SRC_RANGES serves. prefixlen counts the svc_id's 32 bits, always
 * matched whole, then the address's (IPv4 IPv4-mapped: 96 more).
 */
#define SRC_RANGE_MAP_SIZE 16384

struct src_range_key {
	__u32 prefixlen;
	__u32 svc_id;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct src_range_key);
	__type(value, __u8);
	__uint(max_entries, SRC_RANGE_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_lb_src_ranges_v1 SEC(".maps");

/*
 * sessionAffinity ClientIP for traffic from outside: the backend each client
 * address was last sent to per frontend (svc_id), reused for the client's new
 * flows within the frontend's timeout while the backend still serves it
 * (kpr_affinity_match_v1), as kube-proxy's affinity does. The socket LB keeps
 * its own, per network namespace (kpr_affinity_v1).
 */
#define LB_AFFINITY_MAP_SIZE 65536

struct lb_affinity_key {
	__u8 client[16];
	__u32 svc_id;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_affinity_key);
	__type(value, struct affinity_value);
	__uint(max_entries, LB_AFFINITY_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_lb_affinity_v1 SEC(".maps");

/*
 * The backend ports that a translated flow has used, by the port as the packet
 * carries it (network order): nonzero once new_flow or dsr_learn wrote a
 * reverse entry for a backend on that port. Every reply of a flow comes from
 * its backend's port, so a packet from any other port cannot be a reply:
 * tc_nodeport_reply, which runs on every packet that enters through the pods'
 * devices, stops after this one array read instead of parsing a flow key and
 * looking it up. Entries are never cleared while pinned (a flow may outlive
 * its backend's Service); the agent seeds the map from the reverse entries
 * when it was created new over older ones (bpf.LoadNodePort).
 */
PORT_MARKS(kpr_lb_reply_ports_v1);

static __always_inline void reply_port_mark(__be16 port)
{
	port_mark(&kpr_lb_reply_ports_v1, port);
}

static __always_inline int reply_port_seen(__be16 port)
{
	return port_marked(&kpr_lb_reply_ports_v1, port);
}

/* A frontend's Maglev table: backend IDs, 0 for "none"; swapped whole by the agent. */
struct maglev_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, MAGLEV_TABLE_SIZE);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__type(key, __u32); /* svc_id */
	__uint(max_entries, MAGLEV_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct maglev_inner);
} kpr_maglev_v1 SEC(".maps");

static __always_inline void count(enum lb_stat stat)
{
	__u64 *c = bpf_map_lookup_elem(&kpr_lb_stats_v1, &stat);

	if (c)
		*c += 1;
}

static __always_inline __u32 now_sec(void)
{
	return (__u32)(bpf_ktime_get_ns() / NSEC_PER_SEC);
}

/* A parsed TCP or UDP packet. */
struct pkt {
	union addr16 saddr;
	union addr16 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 v4;
	__u8 tcp_flags;
	__u8 ttl;
	__u32 l4off;
	__u32 l4len; /* L4 header and payload, from the IP header's length */
	__u32 mtu;   /* set by translate_and_send with VERDICT_TOO_BIG */
	__u8 dsr6;   /* IPv6: a DSR destination options header precedes L4 */
};

enum {
	PARSE_OK,
	PARSE_NOT_MINE,  /* not IP, not TCP/UDP/ICMP, extension headers */
	PARSE_ICMP,      /* ICMP or ICMPv6: for answer_echo and the ICMP error translation */
	PARSE_FRAGMENT,
	PARSE_MALFORMED,
};

/*
 * Makes the first len bytes linear, so that direct packet access can reach
 * them. The caller re-derives and re-checks its pointers afterwards.
 */
static __always_inline int pull(struct __sk_buff *skb, __u32 len)
{
	if ((void *)(long)skb->data + len <= (void *)(long)skb->data_end)
		return 0;
	if (len > skb->len)
		return -1;
	return bpf_skb_pull_data(skb, len) ? -1 : 0;
}

/*
 * l4off comes in as an argument, not through p: a value read back from
 * memory has no bounds the verifier knows, and packet pointers need them.
 */
static __always_inline int parse_l4(struct __sk_buff *skb, struct pkt *p, __u32 l4off,
				    __u32 l4len)
{
	void *data, *end;

	p->l4off = l4off;
	p->l4len = l4len;
	if (p->proto == IPPROTO_TCP) {
		struct tcp_hdr *th;

		if (l4len < sizeof(*th) || pull(skb, l4off + sizeof(*th)))
			return PARSE_MALFORMED;
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		th = data + l4off;
		if ((void *)(th + 1) > end)
			return PARSE_MALFORMED;
		if ((th->doff_res >> 4) < 5 || (__u32)(th->doff_res >> 4) * 4 > l4len)
			return PARSE_MALFORMED;
		p->sport = th->sport;
		p->dport = th->dport;
		p->tcp_flags = th->flags;
		return PARSE_OK;
	}

	struct udp_hdr *uh;

	if (l4len < sizeof(*uh) || pull(skb, l4off + sizeof(*uh)))
		return PARSE_MALFORMED;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	uh = data + l4off;
	if ((void *)(uh + 1) > end)
		return PARSE_MALFORMED;
	if (bpf_ntohs(uh->len) < sizeof(*uh) || bpf_ntohs(uh->len) > l4len)
		return PARSE_MALFORMED;
	p->sport = uh->sport;
	p->dport = uh->dport;
	p->tcp_flags = 0;
	return PARSE_OK;
}

static __always_inline int parse4(struct __sk_buff *skb, struct pkt *p)
{
	struct ip4_hdr *ip;
	void *data, *end;
	__u32 ihl, tot;

	if (pull(skb, ETH_HLEN + sizeof(*ip)))
		return PARSE_MALFORMED;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > end)
		return PARSE_MALFORMED;
	if ((ip->ver_ihl >> 4) != 4)
		return PARSE_MALFORMED;
	ihl = (__u32)(ip->ver_ihl & 0xf) * 4;
	tot = bpf_ntohs(ip->tot_len);
	/* tot beyond the packet: truncated; the stack drops it, so do we not touch it. */
	if (ihl < sizeof(*ip) || tot < ihl || ETH_HLEN + tot > skb->len)
		return PARSE_MALFORMED;
	if (ip->protocol == IPPROTO_ICMP)
		return PARSE_ICMP;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return PARSE_NOT_MINE;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return PARSE_FRAGMENT;

	p->v4 = 1;
	p->proto = ip->protocol;
	p->ttl = ip->ttl;
	p->saddr.w[0] = 0;
	p->saddr.w[1] = 0;
	p->saddr.w[2] = bpf_htonl(0x0000ffff);
	p->saddr.w[3] = ip->saddr;
	p->daddr.w[0] = 0;
	p->daddr.w[1] = 0;
	p->daddr.w[2] = bpf_htonl(0x0000ffff);
	p->daddr.w[3] = ip->daddr;
	return parse_l4(skb, p, ETH_HLEN + ihl, tot - ihl);
}

static __always_inline int parse6(struct __sk_buff *skb, struct pkt *p)
{
	struct ip6_hdr *ip;
	void *data, *end;
	__u32 plen;

	if (pull(skb, ETH_HLEN + sizeof(*ip)))
		return PARSE_MALFORMED;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > end)
		return PARSE_MALFORMED;
	if ((bpf_ntohl(ip->ver_tc_flow) >> 28) != 6)
		return PARSE_MALFORMED;
	if (ip->nexthdr == IPPROTO_ICMPV6)
		return PARSE_ICMP;
	plen = bpf_ntohs(ip->payload_len);
	if (ETH_HLEN + sizeof(*ip) + plen > skb->len)
		return PARSE_MALFORMED;
	p->v4 = 0;
	p->ttl = ip->hop_limit;
	__builtin_memcpy(p->saddr.w, ip->saddr, 16);
	__builtin_memcpy(p->daddr.w, ip->daddr, 16);
	if (ip->nexthdr == IPPROTO_DSTOPTS) {
		/* Only kpr's own DSR header, exactly as dsr_insert writes it. */
		struct dsr_opt6 o;

		if (plen < sizeof(o) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(*ip), &o, sizeof(o)) ||
		    o.hdrlen != DSR_OPT6_HDRLEN || o.type != DSR_OPT6_TYPE || o.len != DSR_OPT6_DATALEN ||
		    (o.nexthdr != IPPROTO_TCP && o.nexthdr != IPPROTO_UDP))
			return PARSE_NOT_MINE;
		p->dsr6 = 1;
		p->proto = o.nexthdr;
		return parse_l4(skb, p, ETH_HLEN + sizeof(*ip) + sizeof(o), plen - sizeof(o));
	}
	/* Other extension headers (fragments among them) are left to the stack for now. */
	if (ip->nexthdr != IPPROTO_TCP && ip->nexthdr != IPPROTO_UDP)
		return PARSE_NOT_MINE;
	p->proto = ip->nexthdr;
	return parse_l4(skb, p, ETH_HLEN + sizeof(*ip), plen);
}

/* Returns PARSE_OK with p filled in, or why the packet is not for us. */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	struct eth_hdr *eth;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	eth = data;
	if ((void *)(eth + 1) > end)
		return PARSE_NOT_MINE;
	if (eth->proto == bpf_htons(ETH_P_IP))
		return parse4(skb, p);
	if (eth->proto == bpf_htons(ETH_P_IPV6))
		return parse6(skb, p);
	return PARSE_NOT_MINE;
}

static __always_inline int not_mine(int parsed)
{
	if (parsed == PARSE_FRAGMENT)
		count(STAT_PASS_FRAGMENT);
	else if (parsed == PARSE_MALFORMED)
		count(STAT_PASS_MALFORMED);
	return VERDICT_NOT_MINE;
}

static __always_inline __u32 rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

/*
 * MurmurHash3_x86_32 of the 40 bytes of the flow key (read as little-endian
 * words, as on every bpfel target). Every node computes the same hash, so a
 * flow picks the same Maglev slot whichever node it reaches. The Go tests
 * hold it to a reference implementation (flowHash).
 */
static __always_inline __u32 flow_hash(const struct flow_key *k, __u32 seed)
{
	const __u32 *w = (const __u32 *)k;
	__u32 h = seed;

#pragma unroll
	for (int i = 0; i < sizeof(*k) / 4; i++) {
		__u32 x = w[i];

		x *= 0xcc9e2d51;
		x = rotl32(x, 15);
		x *= 0x1b873593;
		h ^= x;
		h = rotl32(h, 13);
		h = h * 5 + 0xe6546b64;
	}
	h ^= sizeof(*k);
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 lifetime(const struct lb_config *cfg, __u8 proto, __u16 flags)
{
	if (proto != IPPROTO_TCP)
		return cfg->udp_timeout_sec;
	if ((flags & CT_F_RST) || (flags & (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND)) ==
					  (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND))
		return cfg->tcp_close_timeout_sec;
	if (flags & CT_F_REPLIED)
		return cfg->tcp_timeout_sec;
	return cfg->tcp_syn_timeout_sec;
}

/* The flags a client's (forward) and a backend's (reply) TCP flags set. */
static __always_inline __u16 ct_flags_fwd(__u8 tcp_flags)
{
	return ((tcp_flags & TCP_RST) ? CT_F_RST : 0) | ((tcp_flags & TCP_FIN) ? CT_F_FIN_CLIENT : 0);
}

static __always_inline __u16 ct_flags_reply(__u8 tcp_flags)
{
	return CT_F_REPLIED | ((tcp_flags & TCP_RST) ? CT_F_RST : 0) |
	       ((tcp_flags & TCP_FIN) ? CT_F_FIN_BACKEND : 0);
}

static __always_inline int same_addr(const __u8 *a, const __u8 *b)
{
	union addr16 x, y;

	__builtin_memcpy(x.b, a, 16);
	__builtin_memcpy(y.b, b, 16);
	return addr_equal(&x, &y);
}

/* The forward entry of a reverse entry, if it still is its flow's. */
static __always_inline struct ct_value *ct_of_snat(const struct flow_key *rk,
						   const struct snat_value *rv,
						   struct flow_key *fk)
{
	struct ct_value *ct;

	__builtin_memset(fk, 0, sizeof(*fk));
	__builtin_memcpy(fk->saddr, rv->client_addr, 16);
	__builtin_memcpy(fk->daddr, rv->vip_addr, 16);
	fk->sport = rv->client_port;
	fk->dport = rv->vip_port;
	fk->proto = rk->proto;
	ct = bpf_map_lookup_elem(&kpr_lb_ct_v1, fk);
	if (!ct || ct->snat_port != rk->dport || ct->backend_port != rk->sport ||
	    !same_addr(ct->backend_addr, rk->saddr) || !same_addr(ct->snat_addr, rk->daddr))
		return NULL;
	return ct;
}

/*
 * Whether the flow of a reverse entry is over: idle for longer than its
 * state allows, counting packets of both directions. An expired flow's SNAT
 * port may go to a new flow; its forward entry is deleted with it.
 */
static __always_inline int snat_reclaim(const struct lb_config *cfg, const struct flow_key *rk,
					const struct snat_value *rv, __u32 now)
{
	struct flow_key fk;
	struct ct_value *ct = ct_of_snat(rk, rv, &fk);
	__u32 last = rv->last_seen;
	__u16 flags = rv->flags;

	if (ct) {
		if ((__s32)(ct->last_seen - last) > 0)
			last = ct->last_seen;
		flags |= ct->flags;
	}
	if ((__s32)(now - last) <= (__s32)lifetime(cfg, rk->proto, flags))
		return 0;
	if (ct)
		bpf_map_delete_elem(&kpr_lb_ct_v1, &fk);
	bpf_map_delete_elem(&kpr_lb_snat_v1, rk);
	return 1;
}

/*
 * Claims a SNAT port for rk (backend -> node address, dport filled in here)
 * and writes the reverse entry. Ports are tried at random; an expired flow's
 * port is taken over. BPF_NOEXIST makes the claim atomic against other CPUs.
 */
static __noinline int snat_alloc(const struct lb_config *cfg, struct flow_key *rk,
				 const struct snat_value *rv, __u32 now)
{
	__u32 lo = cfg->snat_port_min, hi = cfg->snat_port_max;
	__u32 n;

	if (lo == 0 || hi < lo)
		return -1;
	n = hi - lo + 1;

#pragma clang loop unroll(disable)
	for (int i = 0; i < SNAT_PROBES; i++) {
		struct snat_value *old;

		rk->dport = bpf_htons((__u16)(lo + bpf_get_prandom_u32() % n));
		old = bpf_map_lookup_elem(&kpr_lb_snat_v1, rk);
		if (old && !snat_reclaim(cfg, rk, old, now))
			continue;
		if (bpf_map_update_elem(&kpr_lb_snat_v1, rk, rv, BPF_NOEXIST) == 0)
			return 0;
	}
	return -1;
}

static __always_inline struct backend *lookup_backend(__u32 id, int v4)
{
	struct backend *be = bpf_map_lookup_elem(&kpr_backends_v1, &id);
	union addr16 a;

	if (!be)
		return NULL;
	__builtin_memcpy(a.b, be->addr, 16);
	/* A packet cannot be translated into the other address family. */
	if (addr_is_v4mapped(&a) != v4)
		return NULL;
	return be;
}

static __always_inline struct backend *lookup_slot(struct svc_key *key, __u16 slot, int v4,
						   __u32 *id)
{
	struct svc_value *sv;

	key->slot = slot;
	sv = bpf_map_lookup_elem(&kpr_svc_v1, key);
	if (!sv)
		return NULL;
	*id = sv->backend_id;
	return lookup_backend(*id, v4);
}

/* Maglev if the frontend has a table, a random slot otherwise (as the socket LB). */
static __always_inline struct backend *select_backend(const struct lb_config *cfg,
						      struct svc_key *key, __u16 count,
						      __u32 svc_id, const struct flow_key *fk,
						      int v4, __u32 *id)
{
	struct backend *be = NULL;
	void *table = bpf_map_lookup_elem(&kpr_maglev_v1, &svc_id);

	if (table && cfg->maglev_size) {
		__u32 idx = flow_hash(fk, cfg->hash_seed) % cfg->maglev_size;
		__u32 *bid = bpf_map_lookup_elem(table, &idx);

		if (bid && *bid) {
			*id = *bid;
			be = lookup_backend(*id, v4);
		}
	}
	if (!be)
		be = lookup_slot(key, (__u16)(bpf_get_prandom_u32() % count + 1), v4, id);
	/* A slot or backend vanished under a concurrent update. */
	if (!be)
		be = lookup_slot(key, 1, v4, id);
	return be;
}

/* What a packet is translated to. */
struct nat_target {
	union addr16 saddr;
	union addr16 daddr;
	__be16 sport;
	__be16 dport;
};

/*
 * Rewrites addresses and ports and fixes the checksums incrementally.
 *
 * IPv4: the address change and the header checksum change cancel out in the
 * packet's one's complement sum, so neither touches skb->csum; the L4
 * checksum gets the pseudo-header difference (BPF_F_PSEUDO_HDR, which with
 * CHECKSUM_COMPLETE also accounts for the checksum field's own change, and
 * with CHECKSUM_PARTIAL updates the pseudo-header sum the field then holds)
 * and the port difference without BPF_F_PSEUDO_HDR (with CHECKSUM_PARTIAL the
 * ports are summed by whoever completes the checksum, so nothing changes).
 * IPv6 has no header checksum: its addresses are stored with
 * BPF_F_RECOMPUTE_CSUM so skb->csum follows them. UDP checksum 0 (none, IPv4)
 * stays 0 and a computed 0 becomes 0xffff (BPF_F_MARK_MANGLED_0).
 *
 * Returns 0, or -1 after a helper failed: the packet may then be half
 * rewritten and must be dropped.
 */
static __always_inline int rewrite(struct __sk_buff *skb, const struct pkt *p,
				   const struct nat_target *t)
{
	__u32 csum_off = p->l4off + (p->proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
	__u64 l4flags = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	union {
		__be16 p[2];
		__u32 w;
	} oldports = {.p = {p->sport, p->dport}}, newports = {.p = {t->sport, t->dport}};
	__s64 diff;

	if (p->v4) {
		__be32 olda[2] = {p->saddr.w[3], p->daddr.w[3]};
		__be32 newa[2] = {t->saddr.w[3], t->daddr.w[3]};

		diff = bpf_csum_diff(olda, sizeof(olda), newa, sizeof(newa), 0);
		if (diff < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, ETH_HLEN + IP4_ADDRS_OFF, newa, sizeof(newa), 0))
			return -1;
		if (bpf_l3_csum_replace(skb, ETH_HLEN + IP4_CSUM_OFF, 0, diff, 0))
			return -1;
	} else {
		__u32 olda[8], newa[8];

		__builtin_memcpy(olda, p->saddr.w, 16);
		__builtin_memcpy(olda + 4, p->daddr.w, 16);
		__builtin_memcpy(newa, t->saddr.w, 16);
		__builtin_memcpy(newa + 4, t->daddr.w, 16);
		diff = bpf_csum_diff(olda, sizeof(olda), newa, sizeof(newa), 0);
		if (diff < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, ETH_HLEN + IP6_ADDRS_OFF, newa, sizeof(newa),
					BPF_F_RECOMPUTE_CSUM))
			return -1;
	}
	if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | l4flags))
		return -1;
	if (bpf_l4_csum_replace(skb, csum_off, oldports.w, newports.w, sizeof(__u32) | l4flags))
		return -1;
	if (bpf_skb_store_bytes(skb, p->l4off, &newports, sizeof(newports), 0))
		return -1;
	return 0;
}

/* As a router does: the packet is forwarded, not delivered. */
static __always_inline int dec_ttl(struct __sk_buff *skb, const struct pkt *p)
{
	__u8 ttl = p->ttl - 1;

	if (p->v4) {
		__u8 *data = (void *)(long)skb->data;
		__u8 *end = (void *)(long)skb->data_end;
		__u8 *ttlp = data + ETH_HLEN + IP4_TTL_OFF;
		__be16 old, new;

		if (ttlp + 2 > end)
			return -1;
		old = *(__be16 *)ttlp; /* ttl and protocol: one checksummed word */
		new = old;
		*(__u8 *)&new = ttl;
		if (bpf_l3_csum_replace(skb, ETH_HLEN + IP4_CSUM_OFF, old, new, sizeof(new)))
			return -1;
		return bpf_skb_store_bytes(skb, ETH_HLEN + IP4_TTL_OFF, &ttl, 1, 0) ? -1 : 0;
	}
	return bpf_skb_store_bytes(skb, ETH_HLEN + IP6_HOP_OFF, &ttl, 1, BPF_F_RECOMPUTE_CSUM) ? -1 : 0;
}

/*
 * Sends the translated packet towards daddr: straight to the egress device
 * when the FIB knows the route (and the neighbour, or lets the kernel resolve
 * it), to the stack otherwise (local destination, forwarding disabled,
 * unreachable: the stack decides). The FIB is asked before anything is
 * rewritten, so the TTL is only decremented for packets kpr forwards itself.
 */
static __always_inline int fib_params(void *ctx, __u32 ifindex, const struct pkt *p,
				      const union addr16 *saddr, const union addr16 *daddr,
				      __u32 tot_len, struct bpf_fib_lookup *fib)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->ifindex = ifindex;
	fib->l4_protocol = p->proto;
	if (p->v4) {
		fib->family = AF_INET;
		fib->ipv4_src = saddr->w[3];
		fib->ipv4_dst = daddr->w[3];
	} else {
		fib->family = AF_INET6;
		__builtin_memcpy(fib->ipv6_src, saddr->w, 16);
		__builtin_memcpy(fib->ipv6_dst, daddr->w, 16);
	}
	/* tot_len 0 (tc only): the kernel checks the MTU against the skb, GSO aware. */
	fib->tot_len = tot_len;
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

static __always_inline int send_fib(struct __sk_buff *skb, const struct pkt *p, int rc,
				    const struct bpf_fib_lookup *fib_res);

/*
 * translate_and_send's answer, with XLATE_ANSWER, for a packet the route to
 * its backend cannot take whole and that may not be fragmented (IPv4 DF, or
 * IPv6): nothing is rewritten, p->mtu is the MTU the client must use (the
 * route's, less a DSR option the packet would carry), and the caller tells the
 * client (icmp_error). Without it the stack would send "fragmentation needed"
 * to the packet's new source, the node's own SNAT address: to itself.
 */
#define VERDICT_TOO_BIG 100
/* Likewise for a packet whose TTL (hop limit) would run out here: time exceeded. */
#define VERDICT_TTL 101

/* Whether a DSR flow's packet carries the option: TCP every SYN (a lost one is sent again),
 * UDP every datagram (nothing tells which one arrived). */
static __always_inline int dsr_carries_option(const struct pkt *p)
{
	return p->proto == IPPROTO_UDP || (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
}

/* translate_and_send's how. */
#define XLATE_ANSWER 1 /* VERDICT_TOO_BIG and VERDICT_TTL instead of passing or dropping */
#define XLATE_DSR 2    /* carry the frontend (p's destination) to the backend's node */

/*
 * Inserts the DSR option right behind the fixed IP header (BPF_ADJ_ROOM_NET),
 * before any options the packet has, where the backend's node looks for it.
 * The L4 checksum is untouched: neither pseudo-header changes. IPv4: the
 * header checksum takes the new length fields and option, which together
 * leave the header's one's complement sum, and so skb->csum, as they were.
 * IPv6 has no header checksum, so its bytes go in with BPF_F_RECOMPUTE_CSUM.
 * Returns 0, or -1 with the packet possibly changed (drop it).
 */
static __noinline int dsr_insert(struct __sk_buff *skb, const struct pkt *p)
{
	if (p->v4) {
		struct dsr_opt4 o = {.type = DSR_OPT4_TYPE, .len = sizeof(o), .port = p->dport,
				     .addr = p->daddr.w[3]};
		__be32 oldw, neww;
		__s64 diff;

		/* version/IHL, TOS, total length: one word. */
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &oldw, sizeof(oldw)))
			return -1;
		neww = oldw;
		((__u8 *)&neww)[0] += sizeof(o) / 4;
		((__be16 *)&neww)[1] = bpf_htons(bpf_ntohs(((__be16 *)&oldw)[1]) + sizeof(o));
		diff = bpf_csum_diff(&oldw, sizeof(oldw), &neww, sizeof(neww), 0);
		if (diff < 0)
			return -1;
		diff = bpf_csum_diff(NULL, 0, (__be32 *)&o, sizeof(o), diff);
		if (diff < 0)
			return -1;
		if (bpf_skb_adjust_room(skb, sizeof(o), BPF_ADJ_ROOM_NET, 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN, &neww, sizeof(neww), 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct ip4_hdr), &o, sizeof(o), 0) ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + IP4_CSUM_OFF, 0, diff, 0))
			return -1;
		return 0;
	}

	struct dsr_opt6 o = {.nexthdr = p->proto, .hdrlen = DSR_OPT6_HDRLEN, .type = DSR_OPT6_TYPE,
			     .len = DSR_OPT6_DATALEN, .port = p->dport};
	__u8 nexthdr = IPPROTO_DSTOPTS;
	__be16 plen = bpf_htons(p->l4len + sizeof(o));

	__builtin_memcpy(o.addr, p->daddr.w, 16);
	if (bpf_skb_adjust_room(skb, sizeof(o), BPF_ADJ_ROOM_NET, 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(struct ip6_hdr), &o, sizeof(o),
				BPF_F_RECOMPUTE_CSUM) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + 4, &plen, sizeof(plen), BPF_F_RECOMPUTE_CSUM) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + 6, &nexthdr, 1, BPF_F_RECOMPUTE_CSUM))
		return -1;
	return 0;
}

static __noinline int translate_and_send(struct __sk_buff *skb, struct pkt *p,
					 const struct nat_target *t, int how)
{
	struct bpf_fib_lookup fib;
	__u32 optlen = 0, tot_len = 0;
	int rc, fwd;

	/* A packet that already carries one (IPv6) keeps it. */
	if ((how & XLATE_DSR) && !p->dsr6 && dsr_carries_option(p)) {
		optlen = p->v4 ? sizeof(struct dsr_opt4) : sizeof(struct dsr_opt6);
		if (p->l4off - ETH_HLEN + optlen > IP4_MAX_HLEN && p->v4) {
			/* The IPv4 header is full of options: no room to say where the flow goes. */
			count(STAT_DROP_DSR_NO_ROOM);
			return TC_ACT_SHOT;
		}
		/* The route must take the packet with the option; a GSO packet is checked per
		 * segment by the kernel (and its segments shrink by the option). */
		if (!skb->gso_size)
			tot_len = p->l4off - ETH_HLEN + p->l4len + optlen;
	}
	rc = fib_params(skb, skb->ifindex, p, &t->saddr, &t->daddr, tot_len, &fib);
	fwd = rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH;

	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && (how & XLATE_ANSWER)) {
		__be16 frag = bpf_htons(0x4000); /* DF */

		if (p->v4 && bpf_skb_load_bytes(skb, ETH_HLEN + 6, &frag, sizeof(frag)))
			frag = 0;
		if (frag & bpf_htons(0x4000)) {
			p->mtu = fib.mtu_result - optlen;
			return VERDICT_TOO_BIG;
		}
	}

	if (fwd && p->ttl <= 1) {
		if (how & XLATE_ANSWER)
			return VERDICT_TTL;
		count(STAT_DROP_TTL);
		return TC_ACT_SHOT;
	}
	if (rewrite(skb, p, t) || (fwd && dec_ttl(skb, p)) || (optlen && dsr_insert(skb, p))) {
		count(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	return send_fib(skb, p, rc, &fib);
}

/* Sends a rewritten packet where the FIB said (fib_params' rc and result). */
static __always_inline int send_fib(struct __sk_buff *skb, const struct pkt *p, int rc,
				    const struct bpf_fib_lookup *fib_res)
{
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib_res->dmac, ETH_ALEN, 0) ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, fib_res->smac, ETH_ALEN, 0)) {
			count(STAT_DROP_ERROR);
			return TC_ACT_SHOT;
		}
		return bpf_redirect(fib_res->ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		struct bpf_redir_neigh nh = {};

		if (p->v4) {
			nh.nh_family = AF_INET;
			nh.ipv4_nh = fib_res->ipv4_dst;
		} else {
			nh.nh_family = AF_INET6;
			__builtin_memcpy(nh.ipv6_nh, fib_res->ipv6_dst, 16);
		}
		return bpf_redirect_neigh(fib_res->ifindex, &nh, sizeof(nh), 0);
	}
	count(STAT_PASS_FIB);
	return TC_ACT_OK;
}

static __always_inline void flow_key_of(struct flow_key *k, const struct pkt *p)
{
	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(k->saddr, p->saddr.b, 16);
	__builtin_memcpy(k->daddr, p->daddr.b, 16);
	k->sport = p->sport;
	k->dport = p->dport;
	k->proto = p->proto;
}

static __always_inline int addr_is_zero(const union addr16 *a)
{
	return !(a->w[0] | a->w[1] | a->w[2] | a->w[3]);
}

/* The reverse key of a forward entry: the backend's reply. */
static __always_inline void snat_key_of(struct flow_key *rk, const struct ct_value *ct, __u8 proto)
{
	__builtin_memset(rk, 0, sizeof(*rk));
	__builtin_memcpy(rk->saddr, ct->backend_addr, 16);
	__builtin_memcpy(rk->daddr, ct->snat_addr, 16);
	rk->sport = ct->backend_port;
	rk->dport = ct->snat_port;
	rk->proto = proto;
}


/*
 * A frontend without endpoints refuses new flows as kube-proxy's reject rule
 * does, so the client fails at once with ECONNREFUSED instead of timing out:
 * TCP gets a RST, UDP an ICMP (ICMPv6) port unreachable, from the address
 * and port the client sent to, back out of the device the packet came in on.
 *
 * Both answers are written into the client's packet, and the kernel may hold
 * that CHECKSUM_PARTIAL (sent by a process on this machine, or by a VM's
 * host, through veth or virtio): its L4 checksum field then holds only the
 * pseudo-header sum, and whoever transmits the packet completes the sum over
 * everything from the L4 header on and writes it at the L4 checksum's offset.
 * A program cannot change that state, so both answers come out right either
 * way:
 * - the RST keeps the TCP header where it was and changes every field
 *   through bpf_l4_csum_replace, which updates either kind of checksum field
 *   (bpf_csum_update keeps a CHECKSUM_COMPLETE packet's sum in step);
 * - the ICMP message starts where the UDP header was, so a completion sums
 *   exactly the ICMP message and writes where UDP's checksum was: into the
 *   ICMP header's unused field, which port unreachable leaves free. That
 *   field is set up so the completion turns it into what makes the ICMP
 *   checksum right (for ICMPv6 it carries the pseudo-header sum, which
 *   ICMPv6's checksum covers and a UDP completion does not). Whether the
 *   packet is CHECKSUM_PARTIAL is not visible to a program: a UDP checksum
 *   field equal to the pseudo-header sum is taken to mean it is (a complete
 *   checksum equals it for one packet in 65536).
 */
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PORT_UNREACH 4
#define ICMPV6_PKT_TOOBIG 2
#define REJECT_TTL 64

static __always_inline void addr_from_be32(union addr16 *a, __be32 v4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0x0000ffff);
	a->w[3] = v4;
}

/*
 * Refusals and echo replies are answers the node makes up itself: a flood of
 * SYNs or pings with forged sources would otherwise turn it into a reflector.
 * Like the kernel's own ICMP (net.ipv4.icmp_msgs_per_sec, icmp_msgs_burst),
 * at most ANSWER_RATE a second per node with bursts of ANSWER_BURST; beyond
 * that the packet is dropped. GCRA: tat is the theoretical arrival time of
 * the next answer, claimed with compare-and-swap across CPUs.
 */
#define ANSWER_RATE 1000
#define ANSWER_BURST 50
#define ANSWER_INTERVAL_NS (NSEC_PER_SEC / ANSWER_RATE)

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} lb_answer_tat SEC(".maps");

static __always_inline int answer_allowed(void)
{
	__u32 zero = 0;
	__u64 *tat = bpf_map_lookup_elem(&lb_answer_tat, &zero);
	__u64 now = bpf_ktime_get_ns(), old, t;

	if (!tat)
		return 0;
	old = *(volatile __u64 *)tat;
	t = old > now ? old : now;
	if (t - now > ANSWER_INTERVAL_NS * (ANSWER_BURST - 1)) {
		count(STAT_RATE_LIMITED);
		return 0;
	}
	/* A lost race counts as no: under a flood that is the right answer. */
	if (__sync_val_compare_and_swap(tat, old, t + ANSWER_INTERVAL_NS) != old) {
		count(STAT_RATE_LIMITED);
		return 0;
	}
	return 1;
}

/* Bytes a RST may drop from the client's segment (options and payload), in chunks. */
#define REJECT_CHUNK 256
#define REJECT_CHUNKS 6

struct icmp_hdr {
	__u8 type;
	__u8 code;
	__sum16 check;
	__be16 unused_hi;
	__be16 unused_lo; /* at offset 6: UDP's checksum offset */
};

/*
 * What reject_udp writes over the packet, from eth on: Ethernet, IP, ICMP,
 * and the client's IP header and first 8 bytes of UDP. The two bytes before
 * eth align the IP header, so the layout needs no packing.
 */
struct unreach4 {
	__u8 align[2];
	struct eth_hdr eth;
	struct ip4_hdr ip;
	struct icmp_hdr icmp;
	struct ip4_hdr quote_ip;
	struct udp_hdr quote_udp;
};

struct unreach6 {
	__u8 align[2];
	struct eth_hdr eth;
	struct ip6_hdr ip;
	struct icmp_hdr icmp;
	struct ip6_hdr quote_ip;
	struct udp_hdr quote_udp;
};

/* What tc_nodeport knows about the packet it translates. */
struct fwd_state {
	struct pkt p;
	struct svc_key key;
	struct flow_key fk;   /* the client's tuple */
	struct ct_value flow; /* where it goes */
	struct flow_key rk;   /* the backend's reply */
	struct snat_value rv;
	struct nat_target t;
	union addr16 snat_addr;
	__u32 svc_id;
	__u32 now;
	__u16 count;
	__u8 preserve_src; /* SVC_F_PRESERVE_SRC or SVC_F_DSR: no SNAT */
	__u8 dsr;          /* SVC_F_DSR: XLATE_DSR */
	__u32 affinity;    /* the frontend's affinity timeout, seconds; 0: none */
	union {
		__u8 chunk[REJECT_CHUNK]; /* reject_tcp: bytes the RST drops */
		struct unreach4 u4;       /* reject_udp */
		struct unreach6 u6;
	} rej;
};

/*
 * Room for fwd_state, which would not fit the 512-byte stack together with
 * the call chain below tc_nodeport. tc programs run with bottom halves
 * disabled and never nest on a CPU, so one entry per CPU is enough.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct fwd_state);
	__uint(max_entries, 1);
} lb_scratch SEC(".maps");

/*
 * A new flow: pick a backend, claim a SNAT port, write the reverse entry and
 * then the forward entry. Returns 0 with s->flow filled in, or a verdict.
 *
 * With SVC_F_PRESERVE_SRC the flow keeps the client's address and port (the
 * "SNAT" address and port are the client's own), so the reverse entry is keyed
 * by the backend's reply straight to the client, which the pod's device hands
 * to tc_nodeport_reply like any other.
 */
static __noinline int new_flow(const struct lb_config *cfg, struct fwd_state *s)
{
	struct ct_value *out = &s->flow;
	struct snat_value *rv = &s->rv;
	struct flow_key *rk = &s->rk;
	struct backend *be;
	__u32 backend_id = 0;

	be = NULL;
	if (s->affinity) {
		struct lb_affinity_key ak = {};
		struct affinity_value *av;

		__builtin_memcpy(ak.client, s->fk.saddr, 16);
		ak.svc_id = s->svc_id;
		av = bpf_map_lookup_elem(&kpr_lb_affinity_v1, &ak);
		if (av && s->now - av->last_used_sec <= s->affinity) {
			struct affinity_match_key mk = {.svc_id = s->svc_id, .backend_id = av->backend_id};

			/* The backend may have left this Service while staying in another. */
			if (bpf_map_lookup_elem(&kpr_affinity_match_v1, &mk)) {
				backend_id = mk.backend_id;
				be = lookup_backend(backend_id, s->p.v4);
			}
		}
	}
	if (!be)
		be = select_backend(cfg, &s->key, s->count, s->svc_id, &s->fk, s->p.v4, &backend_id);
	if (be && s->affinity) {
		struct lb_affinity_key ak = {};
		struct affinity_value av = {.backend_id = backend_id, .last_used_sec = s->now};

		__builtin_memcpy(ak.client, s->fk.saddr, 16);
		ak.svc_id = s->svc_id;
		bpf_map_update_elem(&kpr_lb_affinity_v1, &ak, &av, BPF_ANY);
	}
	if (!be) {
		count(STAT_DROP_NO_BACKEND);
		return TC_ACT_SHOT;
	}

	__builtin_memset(out, 0, sizeof(*out));
	__builtin_memcpy(out->backend_addr, be->addr, 16);
	out->backend_port = be->port;
	__builtin_memcpy(out->snat_addr, s->snat_addr.b, 16);
	out->backend_id = backend_id;
	out->svc_id = s->svc_id;
	out->last_seen = s->now;
	out->flags = ct_flags_fwd(s->p.tcp_flags);

	reply_port_mark(out->backend_port);
	__builtin_memset(rk, 0, sizeof(*rk));
	__builtin_memcpy(rk->saddr, out->backend_addr, 16);
	__builtin_memcpy(rk->daddr, out->snat_addr, 16);
	rk->sport = out->backend_port;
	rk->proto = s->p.proto;
	__builtin_memset(rv, 0, sizeof(*rv));
	__builtin_memcpy(rv->client_addr, s->fk.saddr, 16);
	__builtin_memcpy(rv->vip_addr, s->fk.daddr, 16);
	rv->client_port = s->fk.sport;
	rv->vip_port = s->fk.dport;
	rv->last_seen = s->now;
	if (s->preserve_src) {
		__builtin_memcpy(out->snat_addr, s->fk.saddr, 16);
		__builtin_memcpy(rk->daddr, s->fk.saddr, 16);
		rk->dport = s->fk.sport;
		if (bpf_map_update_elem(&kpr_lb_snat_v1, rk, rv, BPF_ANY)) {
			count(STAT_DROP_ERROR);
			return TC_ACT_SHOT;
		}
	} else if (snat_alloc(cfg, rk, rv, s->now)) {
		count(STAT_DROP_NO_SNAT_PORT);
		return TC_ACT_SHOT;
	}
	out->snat_port = rk->dport;

	if (bpf_map_update_elem(&kpr_lb_ct_v1, &s->fk, out, BPF_NOEXIST)) {
		/*
		 * Another CPU created the flow first: use its entry, give our port
		 * back. Without SNAT there is no port, and the reverse entry may be
		 * the other CPU's own (the same backend): leave it to the LRU.
		 */
		struct ct_value *ct = bpf_map_lookup_elem(&kpr_lb_ct_v1, &s->fk);

		if (!s->preserve_src)
			bpf_map_delete_elem(&kpr_lb_snat_v1, rk);
		if (!ct) {
			count(STAT_DROP_ERROR);
			return TC_ACT_SHOT;
		}
		__builtin_memcpy(out, ct, sizeof(*out));
		return 0;
	}
	count(STAT_NEW_FLOW);
	return 0;
}


static __always_inline __u16 csum_fold32(__u32 c)
{
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)c;
}

/* The client's Ethernet header with both addresses swapped, as the answer's. */
static __always_inline int answer_eth(struct __sk_buff *skb, struct eth_hdr *out)
{
	struct eth_hdr in;

	if (bpf_skb_load_bytes(skb, 0, &in, sizeof(in)))
		return -1;
	__builtin_memcpy(out->dst, in.src, ETH_ALEN);
	__builtin_memcpy(out->src, in.dst, ETH_ALEN);
	out->proto = in.proto;
	return 0;
}

/*
 * A RST for the client's TCP segment (RFC 9293 3.10.7.1): with ACK, seq is
 * the segment's ack; else seq 0 and ack the segment's end. Options and
 * payload go; the IP header keeps its place, the addresses and ports swap
 * (which changes no checksum).
 */
static __noinline int reject_tcp(struct __sk_buff *skb, struct fwd_state *s)
{
	const struct pkt *p = &s->p;
	__u32 l4off = p->l4off, l4len = p->l4len, csum_off = l4off + TCP_CSUM_OFF;
	struct tcp_hdr in, out;
	__u32 end, removed = 0;
	__s64 c;

	if (p->tcp_flags & TCP_RST)
		return TC_ACT_SHOT;
	if (l4off != ETH_HLEN + (p->v4 ? sizeof(struct ip4_hdr) : sizeof(struct ip6_hdr)))
		return TC_ACT_SHOT; /* IP options or a DSR header: not echoed; dropped */
	if (l4len > sizeof(in) + REJECT_CHUNK * REJECT_CHUNKS || l4len < sizeof(in))
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, l4off, &in, sizeof(in)))
		return TC_ACT_SHOT;

	__builtin_memset(&out, 0, sizeof(out));
	out.sport = in.dport;
	out.dport = in.sport;
	out.doff_res = 5 << 4;
	if (in.flags & TCP_ACK) {
		out.seq = in.ack_seq;
		out.flags = TCP_RST;
	} else {
		end = bpf_ntohl(in.seq) + l4len - (__u32)(in.doff_res >> 4) * 4;
		if (in.flags & TCP_SYN)
			end++;
		if (in.flags & TCP_FIN)
			end++;
		out.ack_seq = bpf_htonl(end);
		out.flags = TCP_RST | TCP_ACK;
	}

	/* The sum of the bytes after the fixed header, which the RST drops. */
#pragma clang loop unroll(disable)
	for (int i = 0; i < REJECT_CHUNKS; i++) {
		__u32 off = sizeof(in) + i * REJECT_CHUNK, n;

		if (off >= l4len)
			break;
		n = l4len - off;
		if (n > REJECT_CHUNK)
			n = REJECT_CHUNK;
		/* Bounds the verifier can follow (the compiler's own are signed). */
		asm volatile("" : "+r"(n));
		n &= 2 * REJECT_CHUNK - 1;
		if (n == 0 || n > REJECT_CHUNK)
			return TC_ACT_SHOT;
		/* A short last chunk is summed with zeros after it, which add nothing. */
		__builtin_memset(s->rej.chunk, 0, REJECT_CHUNK);
		if (bpf_skb_load_bytes(skb, l4off + off, s->rej.chunk, n))
			return TC_ACT_SHOT;
		c = bpf_csum_diff(NULL, 0, (__be32 *)s->rej.chunk, REJECT_CHUNK, removed);
		if (c < 0)
			return TC_ACT_SHOT;
		removed = (__u32)c;
	}

	if (bpf_skb_change_tail(skb, l4off + sizeof(out), 0))
		return TC_ACT_SHOT;
	/* Field by field, so that the checksum follows in either state. */
	removed = csum_fold32(removed);
	if ((removed && bpf_l4_csum_replace(skb, csum_off, 0, ~removed & 0xffff, 0)) ||
	    bpf_l4_csum_replace(skb, csum_off, in.seq, out.seq, 4) ||
	    bpf_l4_csum_replace(skb, csum_off, in.ack_seq, out.ack_seq, 4) ||
	    bpf_l4_csum_replace(skb, csum_off, *(__be16 *)&in.doff_res, *(__be16 *)&out.doff_res, 2) ||
	    bpf_l4_csum_replace(skb, csum_off, in.window, 0, 2) ||
	    bpf_l4_csum_replace(skb, csum_off, in.urg_ptr, 0, 2) ||
	    bpf_l4_csum_replace(skb, csum_off, bpf_htons(l4len), bpf_htons(sizeof(out)),
				BPF_F_PSEUDO_HDR | 2))
		return TC_ACT_SHOT;
	/* The dropped bytes left a CHECKSUM_COMPLETE sum (trimmed with them), the checksum
	 * field's change did not: */
	if (removed)
		bpf_csum_update(skb, removed);
	if (bpf_skb_store_bytes(skb, l4off, &out, TCP_CSUM_OFF, 0) ||
	    bpf_skb_store_bytes(skb, l4off + TCP_CSUM_OFF + 2, &out.urg_ptr, 2, 0))
		return TC_ACT_SHOT;

	if (p->v4) {
		__be32 addrs[2] = {p->daddr.w[3], p->saddr.w[3]};
		__be16 old_len = bpf_htons(p->l4off - ETH_HLEN + l4len);
		__be16 new_len = bpf_htons(sizeof(struct ip4_hdr) + sizeof(out));
		__be16 old_ttl, new_ttl;

		if (bpf_skb_load_bytes(skb, ETH_HLEN + IP4_TTL_OFF, &old_ttl, 2))
			return TC_ACT_SHOT;
		new_ttl = old_ttl;
		*(__u8 *)&new_ttl = REJECT_TTL;
		if (bpf_l3_csum_replace(skb, ETH_HLEN + IP4_CSUM_OFF, old_len, new_len, 2) ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + IP4_CSUM_OFF, old_ttl, new_ttl, 2) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + 2, &new_len, 2, 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + IP4_TTL_OFF, &new_ttl, 2, 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + IP4_ADDRS_OFF, addrs, sizeof(addrs), 0))
			return TC_ACT_SHOT;
	} else {
		__u32 addrs[8];
		__be16 new_len = bpf_htons(sizeof(out));
		__u8 hop = REJECT_TTL;

		__builtin_memcpy(addrs, p->daddr.w, 16);
		__builtin_memcpy(addrs + 4, p->saddr.w, 16);
		if (bpf_skb_store_bytes(skb, ETH_HLEN + 4, &new_len, 2, BPF_F_RECOMPUTE_CSUM) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + IP6_HOP_OFF, &hop, 1, BPF_F_RECOMPUTE_CSUM) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + IP6_ADDRS_OFF, addrs, sizeof(addrs),
					BPF_F_RECOMPUTE_CSUM))
			return TC_ACT_SHOT;
	}
	return 0;
}

/*
 * Turns the client's packet into an ICMP (ICMPv6) error about it, of kind
 * (with mtu for ICMP_KIND_TOO_BIG). Returns 0, TC_ACT_SHOT, or ICMP_ERR_CANNOT
 * when no correct one can be made and the packet is untouched: IPv4 options,
 * or a CHECKSUM_PARTIAL packet whose completion would not land in a field the
 * error leaves free (see the reject comment above: only UDP's checksum offset
 * falls into the unused field, and only when the 4 bytes after the ICMP
 * checksum carry nothing, as they do not for "too big").
 */
#define ICMP_ERR_CANNOT 1
#define ICMP_FRAG_NEEDED 4
#define ICMP_TIME_EXCEEDED 11
#define ICMPV6_TIME_EXCEED 3

enum icmp_kind {
	ICMP_KIND_PORT_UNREACH,
	ICMP_KIND_TOO_BIG,
	ICMP_KIND_TTL,
};

/* The one's complement sum of the pseudo-header of an L4 segment of len bytes of proto
 * between a and b (in either order: the sum is the same). */
static __always_inline __s64 pseudo_sum(int v4, const union addr16 *a, const union addr16 *b,
					__u8 proto, __u32 len)
{
	if (v4) {
		struct {
			__be32 a, b;
			__u8 zero, proto;
			__be16 len;
		} ph = {a->w[3], b->w[3], 0, proto, bpf_htons(len)};

		return bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
	}
	struct {
		__u32 a[4], b[4];
		__be32 len;
		__u8 zero[3], proto;
	} ph = {.len = bpf_htonl(len), .proto = proto};

	__builtin_memcpy(ph.a, a->w, 16);
	__builtin_memcpy(ph.b, b->w, 16);
	return bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
}

static __noinline int icmp_error(struct __sk_buff *skb, struct fwd_state *s, enum icmp_kind kind,
				 __u32 mtu)
{
	const struct pkt *p = &s->p;
	struct icmp_hdr ih = {};
	struct udp_hdr uh;
	__sum16 l4check;
	__u32 rest = kind == ICMP_KIND_TOO_BIG ? mtu : 0, len;
	__s64 c;
	int partial;

	if (p->l4off != ETH_HLEN + (p->v4 ? sizeof(struct ip4_hdr) : sizeof(struct ip6_hdr)))
		return ICMP_ERR_CANNOT;
	/* The first 8 bytes of the L4 header, which the error quotes. */
	if (bpf_skb_load_bytes(skb, p->l4off, &uh, sizeof(uh)) ||
	    bpf_skb_load_bytes(skb, p->l4off + (p->proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF),
			       &l4check, sizeof(l4check)))
		return TC_ACT_SHOT;
	c = pseudo_sum(p->v4, &p->saddr, &p->daddr, p->proto, p->l4len);
	if (c < 0)
		return TC_ACT_SHOT;
	partial = l4check == csum_fold32((__u32)c);
	if (partial && (p->proto != IPPROTO_UDP || rest))
		return ICMP_ERR_CANNOT;

	if (p->v4) {
		ih.type = kind == ICMP_KIND_TTL ? ICMP_TIME_EXCEEDED : ICMP_DEST_UNREACH;
		ih.code = kind == ICMP_KIND_PORT_UNREACH ? ICMP_PORT_UNREACH :
			  kind == ICMP_KIND_TOO_BIG	 ? ICMP_FRAG_NEEDED : 0;
	} else {
		ih.type = kind == ICMP_KIND_TTL	    ? ICMPV6_TIME_EXCEED :
			  kind == ICMP_KIND_TOO_BIG ? ICMPV6_PKT_TOOBIG : ICMPV6_DEST_UNREACH;
		ih.code = kind == ICMP_KIND_PORT_UNREACH ? ICMPV6_PORT_UNREACH : 0;
	}
	/* IPv4 "too big": the next-hop MTU in the low 16 bits (RFC 1191); IPv6: all 32. */
	ih.unused_hi = bpf_htons((__u16)(rest >> 16));
	ih.unused_lo = bpf_htons((__u16)rest);

	if (p->v4) {
		struct unreach4 *u = &s->rej.u4;

		if (answer_eth(skb, &u->eth) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN, &u->quote_ip, sizeof(u->quote_ip)))
			return TC_ACT_SHOT;
		u->quote_udp = uh;
		u->ip.ver_ihl = 0x45;
		u->ip.tos = 0;
		u->ip.tot_len = bpf_htons(sizeof(*u) - 2 - ETH_HLEN);
		u->ip.id = 0;
		u->ip.frag_off = 0;
		u->ip.ttl = REJECT_TTL;
		u->ip.protocol = IPPROTO_ICMP;
		u->ip.check = 0;
		u->ip.saddr = p->daddr.w[3];
		u->ip.daddr = p->saddr.w[3];
		c = bpf_csum_diff(NULL, 0, (__be32 *)&u->ip, sizeof(u->ip), 0);
		if (c < 0)
			return TC_ACT_SHOT;
		u->ip.check = ~csum_fold32((__u32)c);
		u->icmp = ih;
		if (!partial) {
			c = bpf_csum_diff(NULL, 0, (__be32 *)&u->icmp,
					  sizeof(*u) - offsetof(struct unreach4, icmp), 0);
			if (c < 0)
				return TC_ACT_SHOT;
			u->icmp.check = ~csum_fold32((__u32)c);
		}
		len = sizeof(*u) - 2;
	} else {
		struct unreach6 *u = &s->rej.u6;
		__u32 icmp_len = sizeof(*u) - offsetof(struct unreach6, icmp), psum;

		if (answer_eth(skb, &u->eth) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN, &u->quote_ip, sizeof(u->quote_ip)))
			return TC_ACT_SHOT;
		u->quote_udp = uh;
		u->ip.ver_tc_flow = bpf_htonl(6 << 28);
		u->ip.payload_len = bpf_htons(icmp_len);
		u->ip.nexthdr = IPPROTO_ICMPV6;
		u->ip.hop_limit = REJECT_TTL;
		__builtin_memcpy(u->ip.saddr, p->daddr.w, 16);
		__builtin_memcpy(u->ip.daddr, p->saddr.w, 16);
		c = pseudo_sum(0, &p->saddr, &p->daddr, IPPROTO_ICMPV6, icmp_len);
		if (c < 0)
			return TC_ACT_SHOT;
		psum = (__u32)c;
		u->icmp = ih;
		if (partial) {
			/* The completion writes here the complement of the sum of the ICMP message
			 * with this field in it: with the pseudo-header sum here, that is the
			 * value that makes the whole, pseudo-header included, sum right. */
			u->icmp.unused_lo = csum_fold32(psum);
		} else {
			c = bpf_csum_diff(NULL, 0, (__be32 *)&u->icmp, icmp_len, psum);
			if (c < 0)
				return TC_ACT_SHOT;
			u->icmp.check = ~csum_fold32((__u32)c);
		}
		len = sizeof(*u) - 2;
	}
	if (bpf_skb_change_tail(skb, len, 0) ||
	    bpf_skb_store_bytes(skb, 0, &s->rej.u4.eth, len, BPF_F_RECOMPUTE_CSUM))
		return TC_ACT_SHOT;
	return 0;
}

/* Sends the client's packet, turned into a refusal, back where it came from. */
static __always_inline int reject(struct __sk_buff *skb, struct fwd_state *s)
{
	int err;

	if (!answer_allowed())
		return TC_ACT_SHOT;
	if (s->p.proto == IPPROTO_TCP) {
		struct eth_hdr eth;

		err = reject_tcp(skb, s);
		if (!err && (answer_eth(skb, &eth) || bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0)))
			err = TC_ACT_SHOT;
	} else {
		err = icmp_error(skb, s, ICMP_KIND_PORT_UNREACH, 0);
	}
	if (err) {
		count(STAT_DROP_NO_BACKEND);
		return TC_ACT_SHOT;
	}
	count(STAT_REJECT);
	return bpf_redirect(skb->ifindex, 0);
}

/*
 * Ping to a Service address: an ICMP (ICMPv6) echo request to an address
 * whose echo marker {addr, port 0, proto ICMP / ICMPv6, scope 1} exists (an
 * external or load-balancer IP with at least one endpoint) is answered here,
 * from that address, out of the device it came in on. kube-proxy and Cilium
 * leave it unanswered. The request becomes the reply: addresses and MACs
 * swapped (which changes no checksum), TTL 64, type 8 -> 0 (128 -> 129).
 * Echo requests are never CHECKSUM_PARTIAL (ping computes the sum), so the
 * ICMP checksum is updated as a complete one. Returns VERDICT_NOT_MINE for
 * everything else, IPv4 with options and fragments included.
 */
#define ICMP_ECHO 8
#define ICMP_ECHOREPLY 0
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129

static __noinline int answer_echo(struct __sk_buff *skb)
{
	struct eth_hdr eth, reth;
	struct svc_key key = {};
	__u8 hdr[4]; /* type, code, checksum */
	__u32 l4off;
	__be16 old_tc, new_tc;
	int v4;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return VERDICT_NOT_MINE;
	if (eth.proto == bpf_htons(ETH_P_IP)) {
		struct ip4_hdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.ver_ihl != 0x45 ||
		    ip.protocol != IPPROTO_ICMP || (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET)) ||
		    bpf_ntohs(ip.tot_len) < sizeof(ip) + 8 || ETH_HLEN + bpf_ntohs(ip.tot_len) > skb->len)
			return VERDICT_NOT_MINE;
		l4off = ETH_HLEN + sizeof(ip);
		v4 = 1;
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], &ip.daddr, 4);
		key.proto = IPPROTO_ICMP;
	} else if (eth.proto == bpf_htons(ETH_P_IPV6)) {
		struct ip6_hdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) ||
		    (bpf_ntohl(ip.ver_tc_flow) >> 28) != 6 || ip.nexthdr != IPPROTO_ICMPV6 ||
		    bpf_ntohs(ip.payload_len) < 8 ||
		    ETH_HLEN + sizeof(ip) + bpf_ntohs(ip.payload_len) > skb->len)
			return VERDICT_NOT_MINE;
		l4off = ETH_HLEN + sizeof(ip);
		v4 = 0;
		__builtin_memcpy(key.addr, ip.daddr, 16);
		key.proto = IPPROTO_ICMPV6;
	} else {
		return VERDICT_NOT_MINE;
	}
	if (bpf_skb_load_bytes(skb, l4off, hdr, sizeof(hdr)) || hdr[1] != 0 ||
	    hdr[0] != (v4 ? ICMP_ECHO : ICMPV6_ECHO_REQUEST))
		return VERDICT_NOT_MINE;
	key.scope = SCOPE_EXTERNAL;
	if (!bpf_map_lookup_elem(&kpr_svc_v1, &key))
		return VERDICT_NOT_MINE;
	if (!answer_allowed())
		return TC_ACT_SHOT;

	__builtin_memcpy(reth.dst, eth.src, ETH_ALEN);
	__builtin_memcpy(reth.src, eth.dst, ETH_ALEN);
	reth.proto = eth.proto;
	old_tc = *(__be16 *)hdr;
	hdr[0] = v4 ? ICMP_ECHOREPLY : ICMPV6_ECHO_REPLY;
	new_tc = *(__be16 *)hdr;
	if (bpf_l4_csum_replace(skb, l4off + 2, old_tc, new_tc, 2) ||
	    bpf_skb_store_bytes(skb, l4off, &new_tc, 2, 0) ||
	    bpf_skb_store_bytes(skb, 0, &reth, sizeof(reth), 0))
		goto drop;
	if (v4) {
		__be32 addrs[2];
		__be16 old_ttl, new_ttl;

		if (bpf_skb_load_bytes(skb, ETH_HLEN + IP4_ADDRS_OFF + 4, &addrs[0], 4) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + IP4_ADDRS_OFF, &addrs[1], 4) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + IP4_TTL_OFF, &old_ttl, 2))
			goto drop;
		new_ttl = old_ttl;
		*(__u8 *)&new_ttl = REJECT_TTL;
		if (bpf_l3_csum_replace(skb, ETH_HLEN + IP4_CSUM_OFF, old_ttl, new_ttl, 2) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + IP4_TTL_OFF, &new_ttl, 2, 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + IP4_ADDRS_OFF, addrs, sizeof(addrs), 0))
			goto drop;
	} else {
		__u32 addrs[8];
		__u8 hop = REJECT_TTL;

		if (bpf_skb_load_bytes(skb, ETH_HLEN + IP6_ADDRS_OFF + 16, &addrs[0], 16) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + IP6_ADDRS_OFF, &addrs[4], 16) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + IP6_HOP_OFF, &hop, 1, BPF_F_RECOMPUTE_CSUM) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + IP6_ADDRS_OFF, addrs, sizeof(addrs),
					BPF_F_RECOMPUTE_CSUM))
			goto drop;
	}
	count(STAT_ECHO_REPLY);
	return bpf_redirect(skb->ifindex, 0);
drop:
	count(STAT_DROP_ERROR);
	return TC_ACT_SHOT;
}

/*
 * ICMP errors about translated flows, so that path MTU discovery (and a
 * port unreachable from a backend's host) works through a frontend:
 * - an error addressed to this node about a packet it sent to a backend
 *   (inner: SNAT address -> backend, or client -> backend without SNAT) goes
 *   to the client, as if about the client's own packet to the frontend
 *   (tc_nodeport_reply, found by the reverse entry);
 * - an error addressed to a frontend about a reply it sent to a client
 *   (inner: frontend -> client) goes to the backend, as if about the
 *   backend's packet to the SNAT address (tc_nodeport, by the forward entry).
 * The outer source becomes the frontend, or the SNAT address. Inner
 * addresses, ports and the inner IPv4 header checksum are rewritten, the
 * ICMP checksum follows every change; the inner TCP/UDP checksum, which no
 * receiver checks in a quote, is left as it is. ICMP is never
 * CHECKSUM_PARTIAL, so its checksum is updated as a complete one.
 * IPv4: destination unreachable and time exceeded; IPv6: destination
 * unreachable, packet too big, time exceeded. Quotes with IPv4 options or
 * IPv6 extension headers, or of other protocols, are left alone.
 */

struct icmp_err {
	union addr16 osrc, odst; /* outer */
	union addr16 isrc, idst; /* quoted */
	__be16 isport, idport;
	__u32 icmp_off, inner_off, inner_l4;
	__u8 v4, proto, ttl;
};

struct icmp_nat {
	union addr16 osrc, odst, isrc, idst;
	__be16 isport, idport;
};

/* Off the stack, which the call chain below would overflow; per CPU, as lb_scratch. */
struct icmp_scratch {
	struct icmp_err e;
	struct icmp_nat n;
	__u32 old_addrs[8], new_addrs[8];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct icmp_scratch);
	__uint(max_entries, 1);
} lb_icmp_scratch SEC(".maps");

/* 0 with e filled in if skb is an ICMP error quoting a TCP or UDP packet. */
static __noinline int parse_icmp_err(struct __sk_buff *skb, struct icmp_err *e)
{
	struct eth_hdr eth;
	__u8 ih[4];
	__be16 ports[2];

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return -1;
	if (eth.proto == bpf_htons(ETH_P_IP)) {
		struct ip4_hdr o, i;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &o, sizeof(o)) || o.ver_ihl != 0x45 ||
		    o.protocol != IPPROTO_ICMP || (o.frag_off & bpf_htons(IP_MF | IP_OFFSET)))
			return -1;
		e->icmp_off = ETH_HLEN + sizeof(o);
		if (bpf_skb_load_bytes(skb, e->icmp_off, ih, sizeof(ih)) ||
		    (ih[0] != ICMP_DEST_UNREACH && ih[0] != ICMP_TIME_EXCEEDED))
			return -1;
		e->inner_off = e->icmp_off + 8;
		if (bpf_skb_load_bytes(skb, e->inner_off, &i, sizeof(i)) || i.ver_ihl != 0x45 ||
		    (i.protocol != IPPROTO_TCP && i.protocol != IPPROTO_UDP))
			return -1;
		e->v4 = 1;
		e->ttl = o.ttl;
		e->proto = i.protocol;
		e->inner_l4 = e->inner_off + sizeof(i);
		addr_from_be32(&e->osrc, o.saddr);
		addr_from_be32(&e->odst, o.daddr);
		addr_from_be32(&e->isrc, i.saddr);
		addr_from_be32(&e->idst, i.daddr);
	} else if (eth.proto == bpf_htons(ETH_P_IPV6)) {
		struct ip6_hdr o, i;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &o, sizeof(o)) ||
		    (bpf_ntohl(o.ver_tc_flow) >> 28) != 6 || o.nexthdr != IPPROTO_ICMPV6)
			return -1;
		e->icmp_off = ETH_HLEN + sizeof(o);
		if (bpf_skb_load_bytes(skb, e->icmp_off, ih, sizeof(ih)) ||
		    (ih[0] != ICMPV6_DEST_UNREACH && ih[0] != ICMPV6_PKT_TOOBIG &&
		     ih[0] != ICMPV6_TIME_EXCEED))
			return -1;
		e->inner_off = e->icmp_off + 8;
		if (bpf_skb_load_bytes(skb, e->inner_off, &i, sizeof(i)) ||
		    (bpf_ntohl(i.ver_tc_flow) >> 28) != 6 ||
		    (i.nexthdr != IPPROTO_TCP && i.nexthdr != IPPROTO_UDP))
			return -1;
		e->v4 = 0;
		e->ttl = o.hop_limit;
		e->proto = i.nexthdr;
		e->inner_l4 = e->inner_off + sizeof(i);
		__builtin_memcpy(e->osrc.w, o.saddr, 16);
		__builtin_memcpy(e->odst.w, o.daddr, 16);
		__builtin_memcpy(e->isrc.w, i.saddr, 16);
		__builtin_memcpy(e->idst.w, i.daddr, 16);
	} else {
		return -1;
	}
	if (bpf_skb_load_bytes(skb, e->inner_l4, ports, sizeof(ports)))
		return -1;
	e->isport = ports[0];
	e->idport = ports[1];
	return 0;
}

/* The complement-sum c (from bpf_csum_diff) applied to the checksum field value check. */
static __always_inline __u16 csum_apply(__u16 check, __u32 c)
{
	__u64 s = (__u64)(__u16)~check + c;

	s = (s & 0xffffffff) + (s >> 32);
	return ~csum_fold32((__u32)s);
}

static __noinline int icmp_err_rewrite(struct __sk_buff *skb, struct icmp_scratch *sc)
{
	const struct icmp_err *e = &sc->e;
	const struct icmp_nat *n = &sc->n;
	__u32 csum_off = e->icmp_off + 2;
	union {
		__be16 p[2];
		__u32 w;
	} oldports = {.p = {e->isport, e->idport}}, newports = {.p = {n->isport, n->idport}};
	__s64 d;

	if (e->v4) {
		__be32 oo[2] = {e->osrc.w[3], e->odst.w[3]}, on[2] = {n->osrc.w[3], n->odst.w[3]};
		__be32 io[2] = {e->isrc.w[3], e->idst.w[3]}, in[2] = {n->isrc.w[3], n->idst.w[3]};
		__u16 ocheck, ncheck;

		d = bpf_csum_diff(oo, sizeof(oo), on, sizeof(on), 0);
		if (d < 0 || bpf_skb_store_bytes(skb, ETH_HLEN + IP4_ADDRS_OFF, on, sizeof(on), 0) ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + IP4_CSUM_OFF, 0, d, 0))
			return -1;
		d = bpf_csum_diff(io, sizeof(io), in, sizeof(in), 0);
		if (d < 0 || bpf_skb_load_bytes(skb, e->inner_off + IP4_CSUM_OFF, &ocheck, 2))
			return -1;
		ncheck = csum_apply(ocheck, (__u32)d);
		if (bpf_skb_store_bytes(skb, e->inner_off + IP4_ADDRS_OFF, in, sizeof(in), 0) ||
		    bpf_skb_store_bytes(skb, e->inner_off + IP4_CSUM_OFF, &ncheck, 2, 0) ||
		    bpf_l4_csum_replace(skb, csum_off, 0, d, 0) ||
		    bpf_l4_csum_replace(skb, csum_off, ocheck, ncheck, 2))
			return -1;
	} else {
		__u32 *o = sc->old_addrs, *w = sc->new_addrs;

		__builtin_memcpy(o, e->osrc.w, 16);
		__builtin_memcpy(o + 4, e->odst.w, 16);
		__builtin_memcpy(w, n->osrc.w, 16);
		__builtin_memcpy(w + 4, n->odst.w, 16);
		/* The outer addresses are in ICMPv6's pseudo-header. */
		d = bpf_csum_diff(o, 32, w, 32, 0);
		if (d < 0 || bpf_skb_store_bytes(skb, ETH_HLEN + IP6_ADDRS_OFF, w, 32, BPF_F_RECOMPUTE_CSUM) ||
		    bpf_l4_csum_replace(skb, csum_off, 0, d, BPF_F_PSEUDO_HDR))
			return -1;
		__builtin_memcpy(o, e->isrc.w, 16);
		__builtin_memcpy(o + 4, e->idst.w, 16);
		__builtin_memcpy(w, n->isrc.w, 16);
		__builtin_memcpy(w + 4, n->idst.w, 16);
		d = bpf_csum_diff(o, 32, w, 32, 0);
		if (d < 0 || bpf_skb_store_bytes(skb, e->inner_off + IP6_ADDRS_OFF, w, 32, 0) ||
		    bpf_l4_csum_replace(skb, csum_off, 0, d, 0))
			return -1;
	}
	if (bpf_l4_csum_replace(skb, csum_off, oldports.w, newports.w, sizeof(__u32)) ||
	    bpf_skb_store_bytes(skb, e->inner_l4, &newports, sizeof(newports), 0))
		return -1;
	return 0;
}

/* Rewrites the error as n says and sends it on, as translate_and_send does a flow's packet. */
static __noinline int icmp_err_send(struct __sk_buff *skb, struct icmp_scratch *sc)
{
	const struct icmp_err *e = &sc->e;
	const struct icmp_nat *n = &sc->n;
	struct pkt p = {};
	struct bpf_fib_lookup fib;
	int rc, fwd;

	p.v4 = e->v4;
	p.proto = e->v4 ? IPPROTO_ICMP : IPPROTO_ICMPV6;
	p.ttl = e->ttl;
	rc = fib_params(skb, skb->ifindex, &p, &n->osrc, &n->odst, 0, &fib);
	fwd = rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH;
	if (fwd && p.ttl <= 1) {
		count(STAT_DROP_TTL);
		return TC_ACT_SHOT;
	}
	if (icmp_err_rewrite(skb, sc) || (fwd && dec_ttl(skb, &p))) {
		count(STAT_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	count(STAT_ICMP_ERROR);
	return send_fib(skb, &p, rc, &fib);
}

/*
 * The error in skb parsed into the scratch, and k the flow key of the quoted
 * packet's answer (addresses and ports swapped): the forward entry's key when
 * a reply is quoted, the reverse entry's when a packet to a backend is.
 */
static __always_inline struct icmp_scratch *icmp_err_begin(struct __sk_buff *skb,
							   struct flow_key *k)
{
	__u32 zero = 0;
	struct icmp_scratch *sc = bpf_map_lookup_elem(&lb_icmp_scratch, &zero);

	/* parse_icmp_err sets every field of e, icmp_err_target every field of n. */
	if (!sc)
		return NULL;
	if (parse_icmp_err(skb, &sc->e))
		return NULL;
	__builtin_memcpy(k->saddr, sc->e.idst.b, 16);
	__builtin_memcpy(k->daddr, sc->e.isrc.b, 16);
	k->sport = sc->e.idport;
	k->dport = sc->e.isport;
	k->proto = sc->e.proto;
	return sc;
}

/*
 * The translated error goes from a to b about b's packet to a: outer a -> b,
 * quoting b:bport -> a:aport.
 */
static __always_inline void icmp_err_target(struct icmp_nat *n, const __u8 *a, __be16 aport,
					    const __u8 *b, __be16 bport)
{
	__builtin_memcpy(n->osrc.b, a, 16);
	__builtin_memcpy(n->odst.b, b, 16);
	__builtin_memcpy(n->isrc.b, b, 16);
	__builtin_memcpy(n->idst.b, a, 16);
	n->isport = bport;
	n->idport = aport;
}

/* tc_nodeport: an error about a reply a frontend sent goes to the flow's backend, about the
 * backend's packet to the SNAT address (the client, without SNAT). */
static __noinline int icmp_err_to_backend(struct __sk_buff *skb)
{
	struct flow_key fk = {};
	struct icmp_scratch *sc = icmp_err_begin(skb, &fk);
	struct ct_value *ct;

	if (!sc || !(ct = bpf_map_lookup_elem(&kpr_lb_ct_v1, &fk)))
		return VERDICT_NOT_MINE;
	icmp_err_target(&sc->n, ct->snat_addr, ct->snat_port, ct->backend_addr, ct->backend_port);
	return icmp_err_send(skb, sc);
}

/* tc_nodeport_reply: an error about a packet sent to a backend goes to the client, about the
 * client's packet to the frontend. */
static __noinline int icmp_err_to_client(struct __sk_buff *skb)
{
	struct flow_key rk = {};
	struct icmp_scratch *sc = icmp_err_begin(skb, &rk);
	struct snat_value *rv;

	if (!sc || !(rv = bpf_map_lookup_elem(&kpr_lb_snat_v1, &rk)))
		return VERDICT_NOT_MINE;
	icmp_err_target(&sc->n, rv->vip_addr, rv->vip_port, rv->client_addr, rv->client_port);
	return icmp_err_send(skb, sc);
}

/*
 * loadBalancerSourceRanges: whether the client of p may use the frontend sv.
 * Checked before anything else is done for the packet, as kube-proxy's
 * firewall chain does.
 */
static __always_inline int src_range_allowed(const struct svc_value *sv, const struct pkt *p)
{
	struct src_range_key rk = {.prefixlen = 32 + 128, .svc_id = sv->svc_id};

	if (!(sv->flags & SVC_F_SRC_RANGES))
		return 1;
	__builtin_memcpy(rk.addr, p->saddr.b, 16);
	return bpf_map_lookup_elem(&kpr_lb_src_ranges_v1, &rk) != NULL;
}

/* A backend's reply under the reverse entry rv: where it goes (t), and the flow's state. */
static __always_inline void reply_of(struct snat_value *rv, const struct pkt *p,
				     struct nat_target *t)
{
	__u32 now = now_sec();
	__u16 flags = ct_flags_reply(p->tcp_flags);

	__builtin_memcpy(t->saddr.b, rv->vip_addr, 16);
	__builtin_memcpy(t->daddr.b, rv->client_addr, 16);
	t->sport = rv->vip_port;
	t->dport = rv->client_port;
	if (rv->last_seen != now)
		rv->last_seen = now;
	if ((rv->flags | flags) != rv->flags)
		rv->flags |= flags;
}

/*
 * The flow of the client's packet in s: its conntrack entry (dropped if its
 * backend is gone, reset if the client reuses the tuple for a new connection),
 * else a new flow. Returns 0 with s->flow filled in, or a verdict (a tc one:
 * TC_ACT_SHOT, which is XDP_DROP too). Shared by tc_nodeport and xdp_nodeport.
 */
static __noinline int lookup_flow(const struct lb_config *cfg, struct fwd_state *s)
{
	struct ct_value *ct;

	s->now = now_sec();
	flow_key_of(&s->fk, &s->p);
	ct = bpf_map_lookup_elem(&kpr_lb_ct_v1, &s->fk);
	if (ct && !bpf_map_lookup_elem(&kpr_backends_v1, &ct->backend_id)) {
		/* The backend is gone: the flow starts over on another one. */
		struct flow_key rk;

		snat_key_of(&rk, ct, s->p.proto);
		bpf_map_delete_elem(&kpr_lb_snat_v1, &rk);
		bpf_map_delete_elem(&kpr_lb_ct_v1, &s->fk);
		ct = NULL;
	}
	if (ct) {
		__builtin_memcpy(&s->flow, ct, sizeof(s->flow));
		if (ct->last_seen != s->now)
			ct->last_seen = s->now;
		if ((s->p.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN && ct->flags) {
			/* The client reuses the tuple for a new connection. */
			struct flow_key rk;
			struct snat_value *rv;

			ct->flags = 0;
			snat_key_of(&rk, &s->flow, s->p.proto);
			rv = bpf_map_lookup_elem(&kpr_lb_snat_v1, &rk);
			if (rv) {
				rv->flags = 0;
				rv->last_seen = s->now;
			}
		} else {
			__u16 f = ct_flags_fwd(s->p.tcp_flags);

			if ((ct->flags | f) != ct->flags)
				ct->flags |= f;
		}
		return 0;
	}
	return new_flow(cfg, s);
}

/*
 * The backend's node of a DSR flow: a client's packet to a backend (not to a
 * frontend of this node) carrying the frontend in kpr's option. The reverse
 * entry it leaves, keyed as the backend's reply to the client, makes
 * tc_nodeport_reply send the replies from the frontend straight to the client,
 * as for a flow this node translated without SNAT. The option stays in the
 * packet: the backend's stack ignores it (IPv4: unknown options are skipped on
 * receive; IPv6: the option type says "skip").
 *
 * Like the other nodes of the cluster network, the sender is trusted: a host
 * that can reach a pod directly can make the pod's replies to itself appear
 * to come from any address (as with Cilium's DSR).
 */
static __noinline void dsr_learn(struct __sk_buff *skb, const struct pkt *p)
{
	struct flow_key rk = {};
	struct snat_value rv = {};

	if (p->v4) {
		struct dsr_opt4 o;

		if (bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(struct ip4_hdr), &o, sizeof(o)) ||
		    o.type != DSR_OPT4_TYPE || o.len != sizeof(o))
			return;
		addr_from_be32((union addr16 *)rv.vip_addr, o.addr);
		rv.vip_port = o.port;
	} else {
		struct dsr_opt6 o;

		if (bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(struct ip6_hdr), &o, sizeof(o)))
			return;
		__builtin_memcpy(rv.vip_addr, o.addr, 16);
		rv.vip_port = o.port;
	}
	if (!rv.vip_port)
		return;
	__builtin_memcpy(rv.client_addr, p->saddr.b, 16);
	rv.client_port = p->sport;
	rv.last_seen = now_sec();
	__builtin_memcpy(rk.saddr, p->daddr.b, 16);
	__builtin_memcpy(rk.daddr, p->saddr.b, 16);
	rk.sport = p->dport;
	rk.dport = p->sport;
	rk.proto = p->proto;
	reply_port_mark(rk.sport);
	if (bpf_map_update_elem(&kpr_lb_snat_v1, &rk, &rv, BPF_ANY) == 0)
		count(STAT_DSR_LEARNED);
}

/* A backend's reply to one of this node's SNAT ports (or, without SNAT, to a
 * client), translated back and sent to the client. */
static __noinline int reply_to_client(struct __sk_buff *skb, struct pkt *p)
{
	struct flow_key rk;
	struct snat_value *rv;
	struct nat_target t;

	if (!reply_port_seen(p->sport))
		return VERDICT_NOT_MINE;
	flow_key_of(&rk, p);
	rv = bpf_map_lookup_elem(&kpr_lb_snat_v1, &rk);
	if (!rv)
		return VERDICT_NOT_MINE;
	reply_of(rv, p, &t);
	count(STAT_REPLY);
	return translate_and_send(skb, p, &t, 0);
}

/*
 * On the configured devices: a client's packet to an external frontend, and
 * (so that a reply that comes back through the same device costs one program
 * run, not two) a backend's reply to a translated flow, as tc_nodeport_reply
 * does on the node's other devices.
 */
SEC("tc")
int tc_nodeport(struct __sk_buff *skb)
{
	struct fwd_state *s;
	struct svc_value *sv;
	struct lb_config *cfg;
	__u32 zero = 0;
	int parsed, verdict;

	s = bpf_map_lookup_elem(&lb_scratch, &zero);
	if (!s)
		return VERDICT_NOT_MINE;
	__builtin_memset(s, 0, sizeof(*s));
	parsed = parse(skb, &s->p);
	if (parsed == PARSE_ICMP) {
		verdict = answer_echo(skb);
		if (verdict == VERDICT_NOT_MINE)
			verdict = icmp_err_to_backend(skb);
		return verdict == VERDICT_NOT_MINE ? icmp_err_to_client(skb) : verdict;
	}
	if (parsed != PARSE_OK)
		return not_mine(parsed);

	__builtin_memcpy(s->key.addr, s->p.daddr.b, 16);
	s->key.port = s->p.dport;
	s->key.proto = s->p.proto;
	s->key.scope = SCOPE_EXTERNAL;
	sv = bpf_map_lookup_elem(&kpr_svc_v1, &s->key);
	if (!sv) {
		/* A VIP's port it does not serve: must not leak out of the node. */
		s->key.port = 0;
		s->key.proto = 0;
		if (bpf_map_lookup_elem(&kpr_svc_v1, &s->key)) {
			count(STAT_DROP_NOT_SERVED);
			return TC_ACT_SHOT;
		}
		/* Another node's DSR flow to a backend behind this one. */
		if (s->p.dsr6 || (s->p.v4 && s->p.l4off > ETH_HLEN + sizeof(struct ip4_hdr))) {
			dsr_learn(skb, &s->p);
			return VERDICT_NOT_MINE;
		}
		return reply_to_client(skb, &s->p);
	}
	if (!src_range_allowed(sv, &s->p)) {
		count(STAT_DROP_SOURCE_RANGE);
		return TC_ACT_SHOT;
	}
	s->count = sv->count;
	s->svc_id = sv->svc_id;
	s->affinity = sv->affinity_timeout_sec;
	s->preserve_src = (sv->flags & (SVC_F_PRESERVE_SRC | SVC_F_DSR)) != 0;
	s->dsr = sv->flags & SVC_F_DSR ? XLATE_DSR : 0;
	if (s->count == 0) {
		/* kube-proxy rejects where no endpoint exists, drops where endpoints exist
		 * but none is usable here (externalTrafficPolicy Local): SVC_F_UNREACHABLE. */
		if (!(sv->flags & SVC_F_UNREACHABLE))
			return reject(skb, s);
		count(STAT_DROP_NO_BACKEND);
		return TC_ACT_SHOT;
	}

	cfg = bpf_map_lookup_elem(&kpr_lb_config_v1, &zero);
	if (!cfg || cfg->snat_port_min == 0)
		return VERDICT_NOT_MINE;
	__builtin_memcpy(s->snat_addr.b, s->p.v4 ? cfg->addr4 : cfg->addr6, 16);
	if (!s->preserve_src && addr_is_zero(&s->snat_addr)) {
		count(STAT_DROP_NO_NODE_ADDR);
		return TC_ACT_SHOT;
	}

	verdict = lookup_flow(cfg, s);
	if (verdict)
		return verdict;

	__builtin_memcpy(s->t.saddr.b, s->flow.snat_addr, 16);
	__builtin_memcpy(s->t.daddr.b, s->flow.backend_addr, 16);
	s->t.sport = s->flow.snat_port;
	s->t.dport = s->flow.backend_port;
	count(STAT_FWD);
	verdict = translate_and_send(skb, &s->p, &s->t, XLATE_ANSWER | s->dsr);
	if (verdict == VERDICT_TTL) {
		/* As a router does (traceroute shows the frontend for this hop). */
		if (answer_allowed() && icmp_error(skb, s, ICMP_KIND_TTL, 0) == 0) {
			count(STAT_TTL_EXCEEDED);
			return bpf_redirect(skb->ifindex, 0);
		}
		count(STAT_DROP_TTL);
		return TC_ACT_SHOT;
	}
	if (verdict != VERDICT_TOO_BIG)
		return verdict;
	/* Tell the client the path MTU, from the frontend; if no correct error can be made
	 * (or too many are being made), pass the packet on as before and let the stack decide. */
	if (answer_allowed()) {
		verdict = icmp_error(skb, s, ICMP_KIND_TOO_BIG, s->p.mtu);
		if (verdict == TC_ACT_SHOT)
			return verdict;
		if (verdict == 0) {
			count(STAT_TOO_BIG);
			return bpf_redirect(skb->ifindex, 0);
		}
	}
	return translate_and_send(skb, &s->p, &s->t, s->dsr);
}

/*
 * The common packet on a pod's device, read in place before anything is
 * parsed: TCP or UDP right behind an IPv4 header without options (not a
 * fragment) or behind an IPv6 header, from a port no translated flow's backend
 * used, is no reply (see kpr_lb_reply_ports_v1). 0: parse it.
 */
static __always_inline int surely_no_reply(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct eth_hdr *eth = data;
	struct tcp_hdr *l4;
	__u8 proto;

	if ((void *)(eth + 1) > end)
		return 0;
	if (eth->proto == bpf_htons(ETH_P_IP)) {
		struct ip4_hdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->ver_ihl != 0x45 ||
		    (ip->frag_off & bpf_htons(0x3fff)))
			return 0;
		proto = ip->protocol;
		l4 = (void *)(ip + 1);
	} else if (eth->proto == bpf_htons(ETH_P_IPV6)) {
		struct ip6_hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return 0;
		proto = ip6->nexthdr;
		l4 = (void *)(ip6 + 1);
	} else {
		return 0;
	}
	if ((proto != IPPROTO_TCP && proto != IPPROTO_UDP) || (void *)l4 + 4 > end)
		return 0;
	return !reply_port_seen(l4->sport);
}

SEC("tc")
int tc_nodeport_reply(struct __sk_buff *skb)
{
	struct pkt p = {};
	int parsed;

	if (surely_no_reply(skb))
		return VERDICT_NOT_MINE;
	parsed = parse(skb, &p);
	if (parsed == PARSE_ICMP)
		return icmp_err_to_client(skb);
	if (parsed != PARSE_OK)
		return not_mine(parsed);
	return reply_to_client(skb, &p);
}

/*
 * XDP acceleration (acceleration: native | best-effort): the common case of
 * tc_nodeport and tc_nodeport_reply done before the kernel makes an skb. A
 * client's packet to a frontend, or a backend's reply to a SNAT port, whose
 * translated packet leaves by the device it came in on (a backend on another
 * node of the same network, the reply back to the client) is rewritten here
 * and sent with XDP_TX. Everything else passes untouched to the tc programs,
 * which see the packet as if XDP were not there: other egress devices (local
 * pods), IPv4 options, IPv6 extension headers, fragments, ICMP, refusals, the
 * first packets of a DSR flow (the option needs room), a route without a
 * resolved neighbour, a packet too big or a TTL running out. Flows are the
 * same as tc's (the same maps and lookup_flow), so a flow may move between
 * the two from packet to packet.
 *
 * Checksums: a frame from a NIC is complete, so both the IPv4 header checksum
 * and the L4 checksum are updated incrementally as RFC 1624 does. A veth
 * whose peer sends with TX checksum offload hands XDP CHECKSUM_PARTIAL frames
 * (the L4 field holds the pseudo-header sum, and an XDP_TX'd frame is never
 * completed), which XDP cannot tell apart: a frame whose L4 checksum field
 * equals its pseudo-header sum is taken to be one and passed to tc, which
 * handles both kinds (a complete checksum equals it for one frame in 65536,
 * which then takes the tc path too). TestNodePortXDPTraffic covers both.
 */
/* Whether the frame's L4 checksum field holds just its pseudo-header sum (see above). */
static __always_inline int xdp_maybe_partial(struct xdp_md *ctx, const struct pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u16 *field = data + (p->v4 ? ETH_HLEN + sizeof(struct ip4_hdr) : ETH_HLEN + sizeof(struct ip6_hdr)) +
		       (p->proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
	__s64 sum = pseudo_sum(p->v4, &p->saddr, &p->daddr, p->proto, p->l4len);

	if ((void *)(field + 1) > end || sum < 0)
		return 1;
	return *field == csum_fold32((__u32)sum);
}

static __always_inline int xdp_parse(struct xdp_md *ctx, struct pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct eth_hdr *eth = data;
	__u32 l4len;

	if ((void *)(eth + 1) > end)
		return -1;
	if (eth->proto == bpf_htons(ETH_P_IP)) {
		struct ip4_hdr *ip = (void *)(eth + 1);
		__u32 tot;

		if ((void *)(ip + 1) > end || ip->ver_ihl != 0x45 ||
		    (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)) ||
		    (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP))
			return -1;
		tot = bpf_ntohs(ip->tot_len);
		if (tot < sizeof(*ip) || data + ETH_HLEN + tot > end)
			return -1;
		p->v4 = 1;
		p->proto = ip->protocol;
		p->ttl = ip->ttl;
		addr_from_be32(&p->saddr, ip->saddr);
		addr_from_be32(&p->daddr, ip->daddr);
		p->l4off = ETH_HLEN + sizeof(*ip);
		l4len = tot - sizeof(*ip);
	} else if (eth->proto == bpf_htons(ETH_P_IPV6)) {
		struct ip6_hdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || (bpf_ntohl(ip->ver_tc_flow) >> 28) != 6 ||
		    (ip->nexthdr != IPPROTO_TCP && ip->nexthdr != IPPROTO_UDP))
			return -1;
		l4len = bpf_ntohs(ip->payload_len);
		if (data + ETH_HLEN + sizeof(*ip) + l4len > end)
			return -1;
		p->v4 = 0;
		p->proto = ip->nexthdr;
		p->ttl = ip->hop_limit;
		__builtin_memcpy(p->saddr.w, ip->saddr, 16);
		__builtin_memcpy(p->daddr.w, ip->daddr, 16);
		p->l4off = ETH_HLEN + sizeof(*ip);
	} else {
		return -1;
	}
	p->l4len = l4len;
	if (p->proto == IPPROTO_TCP) {
		struct tcp_hdr *th = data + p->l4off;

		if ((void *)(th + 1) > end || l4len < sizeof(*th) || (th->doff_res >> 4) < 5 ||
		    (__u32)(th->doff_res >> 4) * 4 > l4len)
			return -1;
		p->sport = th->sport;
		p->dport = th->dport;
		p->tcp_flags = th->flags;
	} else {
		struct udp_hdr *uh = data + p->l4off;

		if ((void *)(uh + 1) > end || l4len < sizeof(*uh) || bpf_ntohs(uh->len) < sizeof(*uh) ||
		    bpf_ntohs(uh->len) > l4len)
			return -1;
		p->sport = uh->sport;
		p->dport = uh->dport;
		p->tcp_flags = 0;
	}
	return xdp_maybe_partial(ctx, p) ? -1 : 0;
}

/*
 * Asks the FIB for t's route; 0 with fib filled in if the packet can leave
 * whole by the device it came in on, with its neighbour known and TTL to
 * spare. tot_len makes the kernel check the route's MTU.
 */
static __always_inline int xdp_route(struct xdp_md *ctx, const struct pkt *p,
				     const struct nat_target *t, struct bpf_fib_lookup *fib)
{
	if (fib_params(ctx, ctx->ingress_ifindex, p, &t->saddr, &t->daddr,
		       p->l4off - ETH_HLEN + p->l4len, fib) != BPF_FIB_LKUP_RET_SUCCESS)
		return -1;
	if (fib->ifindex != ctx->ingress_ifindex || p->ttl <= 1)
		return -1;
	return 0;
}

/* Rewrites the packet as t says, decrements the TTL and sets the MACs; then XDP_TX. */
static __always_inline int xdp_rewrite(struct xdp_md *ctx, const struct pkt *p,
				       const struct nat_target *t, const struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct eth_hdr *eth = data;
	union {
		__be16 p[2];
		__u32 w;
	} oldports = {.p = {p->sport, p->dport}}, newports = {.p = {t->sport, t->dport}};
	__u32 addr_diff, l4_diff;
	__be16 *ports;
	void *l4;
	__s64 d;

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (p->v4) {
		struct ip4_hdr *ip = (void *)(eth + 1);
		__be32 olda[2], newa[2] = {t->saddr.w[3], t->daddr.w[3]};
		__be16 oldw, neww;

		if ((void *)(ip + 1) > end)
			return XDP_PASS;
		olda[0] = ip->saddr;
		olda[1] = ip->daddr;
		d = bpf_csum_diff(olda, sizeof(olda), newa, sizeof(newa), 0);
		if (d < 0)
			return XDP_PASS;
		addr_diff = (__u32)d;
		oldw = *(__be16 *)&ip->ttl; /* ttl and protocol */
		ip->ttl--;
		neww = *(__be16 *)&ip->ttl;
		ip->saddr = newa[0];
		ip->daddr = newa[1];
		ip->check = csum_apply(ip->check, addr_diff + (__u16)~oldw + neww);
	} else {
		struct ip6_hdr *ip = (void *)(eth + 1);
		__u32 olda[8], newa[8];

		if ((void *)(ip + 1) > end)
			return XDP_PASS;
		__builtin_memcpy(olda, ip->saddr, 16);
		__builtin_memcpy(olda + 4, ip->daddr, 16);
		__builtin_memcpy(newa, t->saddr.w, 16);
		__builtin_memcpy(newa + 4, t->daddr.w, 16);
		d = bpf_csum_diff(olda, sizeof(olda), newa, sizeof(newa), 0);
		if (d < 0)
			return XDP_PASS;
		addr_diff = (__u32)d;
		ip->hop_limit--;
		__builtin_memcpy(ip->saddr, t->saddr.w, 16);
		__builtin_memcpy(ip->daddr, t->daddr.w, 16);
	}
	d = bpf_csum_diff(&oldports.w, sizeof(oldports), &newports.w, sizeof(newports), addr_diff);
	if (d < 0)
		return XDP_DROP; /* addresses already written */
	l4_diff = (__u32)d;
	/* A constant offset (xdp_parse takes no IPv4 options, no IPv6 extension headers):
	 * the verifier needs bounds that a value read back from memory does not have. */
	l4 = data + (p->v4 ? ETH_HLEN + sizeof(struct ip4_hdr) : ETH_HLEN + sizeof(struct ip6_hdr));
	ports = l4;
	if (p->proto == IPPROTO_TCP) {
		struct tcp_hdr *th = l4;

		if ((void *)(th + 1) > end)
			return XDP_DROP;
		th->check = csum_apply(th->check, l4_diff);
	} else {
		struct udp_hdr *uh = l4;

		if ((void *)(uh + 1) > end)
			return XDP_DROP;
		/* IPv4 UDP without checksum stays without; a computed 0 is sent as 0xffff. */
		if (uh->check || !p->v4) {
			uh->check = csum_apply(uh->check, l4_diff);
			if (!uh->check)
				uh->check = 0xffff;
		}
	}
	if ((void *)(ports + 2) > end)
		return XDP_DROP;
	ports[0] = t->sport;
	ports[1] = t->dport;
	__builtin_memcpy(eth->dst, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->src, fib->smac, ETH_ALEN);
	count(STAT_XDP_TX);
	return XDP_TX;
}

/* A backend's reply to one of this node's SNAT ports (or, without SNAT, to a client). */
static __noinline int xdp_reply(struct xdp_md *ctx, struct fwd_state *s)
{
	struct snat_value *rv;
	struct bpf_fib_lookup fib;

	if (!reply_port_seen(s->p.sport))
		return XDP_PASS;
	flow_key_of(&s->rk, &s->p);
	rv = bpf_map_lookup_elem(&kpr_lb_snat_v1, &s->rk);
	if (!rv)
		return XDP_PASS;
	/* Passed on or not, the reply is the flow's (tc would note it the same way). */
	reply_of(rv, &s->p, &s->t);
	if (xdp_route(ctx, &s->p, &s->t, &fib))
		return XDP_PASS;
	count(STAT_REPLY);
	return xdp_rewrite(ctx, &s->p, &s->t, &fib);
}

SEC("xdp")
int xdp_nodeport(struct xdp_md *ctx)
{
	struct bpf_fib_lookup fib;
	struct fwd_state *s;
	struct svc_value *sv;
	struct lb_config *cfg;
	__u32 zero = 0;
	int verdict;

	s = bpf_map_lookup_elem(&lb_scratch, &zero);
	if (!s)
		return XDP_PASS;
	__builtin_memset(&s->p, 0, sizeof(s->p));
	if (xdp_parse(ctx, &s->p))
		return XDP_PASS;

	__builtin_memset(&s->key, 0, sizeof(s->key));
	__builtin_memcpy(s->key.addr, s->p.daddr.b, 16);
	s->key.port = s->p.dport;
	s->key.proto = s->p.proto;
	s->key.scope = SCOPE_EXTERNAL;
	sv = bpf_map_lookup_elem(&kpr_svc_v1, &s->key);
	if (!sv)
		return xdp_reply(ctx, s);
	if (!src_range_allowed(sv, &s->p)) {
		count(STAT_DROP_SOURCE_RANGE);
		return XDP_DROP;
	}
	/* Refusals, and DSR packets that carry the option: tc's. */
	if (sv->count == 0 || ((sv->flags & SVC_F_DSR) && dsr_carries_option(&s->p)))
		return XDP_PASS;
	s->count = sv->count;
	s->svc_id = sv->svc_id;
	s->affinity = sv->affinity_timeout_sec;
	s->preserve_src = (sv->flags & (SVC_F_PRESERVE_SRC | SVC_F_DSR)) != 0;
	s->dsr = 0;

	cfg = bpf_map_lookup_elem(&kpr_lb_config_v1, &zero);
	if (!cfg || cfg->snat_port_min == 0)
		return XDP_PASS;
	__builtin_memcpy(s->snat_addr.b, s->p.v4 ? cfg->addr4 : cfg->addr6, 16);
	if (!s->preserve_src && addr_is_zero(&s->snat_addr))
		return XDP_PASS;
	verdict = lookup_flow(cfg, s);
	if (verdict)
		return verdict == TC_ACT_SHOT ? XDP_DROP : XDP_PASS;

	__builtin_memcpy(s->t.saddr.b, s->flow.snat_addr, 16);
	__builtin_memcpy(s->t.daddr.b, s->flow.backend_addr, 16);
	s->t.sport = s->flow.snat_port;
	s->t.dport = s->flow.backend_port;
	if (xdp_route(ctx, &s->p, &s->t, &fib))
		return XDP_PASS;
	count(STAT_FWD);
	return xdp_rewrite(ctx, &s->p, &s->t, &fib);
}

char __license[] SEC("license") = "Dual BSD/GPL";
