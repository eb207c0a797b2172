/*
 * The load-balancing maps both BPF objects use: the socket LB (sock.c) and
 * the north-south tc programs (lb.c). Both objects declare them from this one
 * header, pinned by name, so objects loaded with the same pin path share one
 * kernel map each: a frontend the agent writes is seen by every program.
 * The map schema (v1) is documented in docs/ARCHITECTURE.md.
 *
 * Include after linux/bpf.h and bpf_helpers.h.
 */
#ifndef KPR_LB_MAPS_H
#define KPR_LB_MAPS_H

/* Not taken from in.h: the build must not use host headers. */
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17

#define SVC_F_UNREACHABLE 1
/*
 * External scope: the backend must see the client's address (externalTrafficPolicy
 * Local, only local backends), so tc_nodeport translates the destination only.
 */
#define SVC_F_PRESERVE_SRC 2
/*
 * External scope: loadBalancerSourceRanges apply; only clients whose address
 * kpr_lb_src_ranges_v1 holds under the frontend's svc_id are served.
 */
#define SVC_F_SRC_RANGES 4
/*
 * External scope: direct server return. The backend sees the client's address
 * (as with SVC_F_PRESERVE_SRC) and the frontend travels with the flow's first
 * packet (TCP: every SYN; UDP: every datagram) in an IPv4 option or an IPv6
 * destination option, so the backend's node can send the replies straight to
 * the client from the frontend. See "DSR" in docs/ARCHITECTURE.md.
 */
#define SVC_F_DSR 8
#define SCOPE_SOCKET 0
#define SCOPE_EXTERNAL 1

/* Default sizes; the loader overrides max_entries from its Config. */
#define SVC_MAP_SIZE 262144
#define BACKEND_MAP_SIZE 262144

/*
 * Every struct below has explicit padding fields so that no byte of a hash
 * key is left to the compiler: the kernel compares keys byte for byte.
 */
struct svc_key {
	__u8 addr[16]; /* IPv4 stored as ::ffff:a.b.c.d */
	__be16 port;   /* 0 together with proto 0: wildcard entry */
	__u8 proto;
	__u8 scope;
	__u16 slot; /* 0: frontend, 1..count: backend slots */
	__u16 pad;
};

struct svc_value {
	__u16 count; /* slot 0 only */
	__u16 flags; /* slot 0 only */
	union {
		__u32 svc_id;     /* slot 0 */
		__u32 backend_id; /* slots 1..count */
	};
	__u32 affinity_timeout_sec; /* slot 0 only */
};

struct backend {
	__u8 addr[16];
	__be16 port;
	__u8 proto;
	__u8 flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
	__uint(max_entries, SVC_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_svc_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct backend);
	__uint(max_entries, BACKEND_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_backends_v1 SEC(".maps");

/* Default size; the loaders override max_entries from their Config. */
#define AFFINITY_MATCH_MAP_SIZE 65536

/* Session affinity: the backend a client was last sent to, and when. */
struct affinity_value {
	__u32 backend_id;
	__u32 last_used_sec;
};

/*
 * Backend IDs are shared between Services (one per backend address, port and
 * protocol), so "the remembered backend still exists" does not mean "it still
 * belongs to this Service". The agent keeps one entry per (svc_id, backend_id)
 * of every frontend with affinity, and an affinity hit is only reused if its
 * pair is here. Shared by the socket and the north-south objects.
 */
struct affinity_match_key {
	__u32 svc_id;
	__u32 backend_id;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct affinity_match_key);
	__type(value, __u8); /* unused: presence is the answer */
	__uint(max_entries, AFFINITY_MATCH_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_affinity_match_v1 SEC(".maps");

/* Addresses as the maps hold them (bytes) and as contexts and headers hold them (words). */
union addr16 {
	__u8 b[16];
	__u32 w[4];
};

static __always_inline int addr_is_v4mapped(const union addr16 *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int addr_equal(const union addr16 *a, const union addr16 *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] &&
	       a->w[3] == b->w[3];
}

/*
 * Port marks: an array of 65536 bytes indexed by a port as packets and socket
 * addresses carry it (network order, read natively), 1 once port_mark() set
 * it, never cleared. A hook that only matters for traffic from a marked port
 * stops at one array read for the rest. Each object declares its own
 * (kpr_lb_reply_ports_v1 in lb.c, kpr_sk_revnat_ports_v1 in sock.c).
 */
#define PORT_MARKS(name)                                   \
	struct {                                           \
		__uint(type, BPF_MAP_TYPE_ARRAY);          \
		__type(key, __u32);                        \
		__type(value, __u8);                       \
		__uint(max_entries, 65536);                \
		__uint(pinning, LIBBPF_PIN_BY_NAME);       \
	} name SEC(".maps")

static __always_inline void port_mark(void *marks, __be16 port)
{
	__u32 k = port;
	__u8 *v = bpf_map_lookup_elem(marks, &k);

	/* Read first: a write would dirty a cache line every CPU reads. */
	if (v && !*v)
		*v = 1;
}

static __always_inline int port_marked(void *marks, __be16 port)
{
	__u32 k = port;
	__u8 *v = bpf_map_lookup_elem(marks, &k);

	return v && *v;
}

#endif /* KPR_LB_MAPS_H */
