//go:build ignore

/*
 * Socket-level load balancer: translates connect()/sendmsg() to a Service
 * VIP into a backend address before the kernel routes anything, and reverses
 * the translation for recvmsg()/getpeername() so applications only ever see
 * the VIP. The map schema (v1) is documented in docs/ARCHITECTURE.md.
 */

#include <linux/bpf.h>
#include <bpf_helpers.h>
#include <bpf_endian.h>

#include "lb_maps.h"

/* Not taken from errno.h: the build must not use host headers. */
#define ECONNREFUSED 111
#define EHOSTUNREACH 113
#define EADDRINUSE 98
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17

#define NSEC_PER_SEC 1000000000ULL

/* Default sizes; the loader overrides max_entries from its Config. */
#define REVNAT_MAP_SIZE 65536
#define SK_REVNAT_MAP_SIZE 131072
#define SK_CONN_MAP_SIZE 131072
#define AFFINITY_MAP_SIZE 65536
/* Fixed: a cluster has one or two Service CIDRs (a few more while one is being migrated). */
#define SVC_CIDR_MAP_SIZE 64

/* Explicit padding, as in lb_maps.h: hash keys are compared byte for byte. */
struct revnat {
	__u8 addr[16];
	__be16 port;
	__u16 pad;
};

struct sk_revnat_key {
	__u64 cookie; /* socket cookie */
	__u8 addr[16]; /* backend */
	__be16 port;   /* backend */
	__u8 pad[6];
};

struct sk_revnat_value {
	__u8 addr[16]; /* VIP */
	__be16 port;   /* VIP */
	__u16 pad;
	__u32 svc_id;
};

struct affinity_key {
	__u64 netns_cookie;
	__u32 svc_id;
	__u32 pad;
};

/*
 * A Service CIDR, as an LPM trie key: prefixlen counts bits of addr, so an
 * IPv4 CIDR a.b.c.d/n is stored IPv4-mapped with prefixlen 96 + n.
 */
struct svc_cidr_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct revnat);
	__uint(max_entries, REVNAT_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_revnat_v1 SEC(".maps");

/*
 * The reverse translation of a connected UDP socket (connect() to a VIP) whose
 * slot in kpr_sk_conn_v1 (below) is taken, kept in the socket itself: every
 * datagram it receives is reverse-translated, for as long as it lives, so its
 * entry must not be evicted by other sockets' (as in the LRU map below), and a
 * connect() elsewhere must drop it. Not the first choice: the allocation and
 * the deferred free of socket storage cost more than a slot
 * (BenchmarkConnectedSocket).
 */
struct sk_peer {
	__u8 be_addr[16];
	__be16 be_port;
	__u16 pad;
	__u8 vip_addr[16];
	__be16 vip_port;
	__u16 pad2;
	__u32 svc_id;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__type(key, int);
	__type(value, struct sk_peer);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_sk_peer_v1 SEC(".maps");

/*
 * The reverse translation of a TCP or UDP socket connected to a VIP, from
 * connect() until the socket is released (sock_release below frees it) or a
 * UDP socket connects elsewhere, in the slot its
 * socket cookie picks: cookie % sk_conn_slots. A slot belongs to the socket
 * whose cookie it holds (0: free), taken and given back with a compare and
 * exchange. The kernel hands out cookies in ascending runs per CPU, so
 * sockets made one after the other use neighbouring slots: connect4,
 * getpeername4 and sock_release touch one array element each, with no hash, no
 * lock and no eviction. In the full LRU map below, connect4's insert evicted
 * some other socket's entry, most of its run time on a busy node. A socket
 * whose slot is held by another live socket (one that lived while as many
 * newer cookies were made as there are slots) keeps its entry in the LRU map
 * (TCP) or in kpr_sk_peer_v1 (UDP).
 */
struct sk_conn {
	__u64 cookie;
	struct sk_peer peer;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct sk_conn);
	__uint(max_entries, SK_CONN_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_sk_conn_v1 SEC(".maps");

/* kpr_sk_conn_v1's max_entries; the loader sets both. */
volatile const __u32 sk_conn_slots = SK_CONN_MAP_SIZE;

static __always_inline struct sk_conn *sk_conn_slot(__u64 cookie)
{
	__u32 i = (__u32)(cookie % sk_conn_slots);

	return bpf_map_lookup_elem(&kpr_sk_conn_v1, &i);
}

/* The slot of the socket with this cookie, if the socket holds it. */
static __always_inline struct sk_conn *sk_conn_owned(__u64 cookie)
{
	struct sk_conn *c = sk_conn_slot(cookie);

	return c && c->cookie == cookie ? c : NULL;
}

/* Gives back the slot the socket with this cookie holds, if it holds one. */
static __always_inline void put_sk_conn(__u64 cookie)
{
	struct sk_conn *c = sk_conn_owned(cookie);

	if (c)
		__sync_val_compare_and_swap(&c->cookie, cookie, 0);
}

/*
 * Reverse translations of unconnected UDP sockets (sendmsg() to a VIP, one per
 * socket and backend), of connected UDP sockets whose storage could not be
 * allocated, and of TCP sockets whose slot in kpr_sk_conn_v1 was taken. LRU:
 * entries of closed sockets age out.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sk_revnat_key);
	__type(value, struct sk_revnat_value);
	__uint(max_entries, SK_REVNAT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_sk_revnat_v1 SEC(".maps");

/*
 * The backend ports of kpr_sk_revnat_v1's and kpr_sk_conn_v1's entries (index:
 * the port as the socket address carries it, network order read natively;
 * value 1 once some entry had it). recvmsg and getpeername of a peer whose
 * port is not marked skip the cookie and the lookups, and sock_release skips
 * the slot: every socket on the node pays those hooks, most for peers that
 * were never translated.
 * Marks are never cleared: an entry can outlive its Service.
 */
PORT_MARKS(kpr_sk_revnat_ports_v1);

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
	__uint(max_entries, AFFINITY_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_affinity_v1 SEC(".maps");

/*
 * The Service CIDRs. An address in one of them that no frontend owns is an
 * unallocated ClusterIP: kube-proxy drops packets to it, kpr refuses it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct svc_cidr_key);
	__type(value, __u8); /* unused: presence is the answer */
	__uint(max_entries, SVC_CIDR_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_svc_cidrs_v1 SEC(".maps");

static __always_inline void addr_from_v4(union addr16 *a, __u32 ip4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0x0000ffff);
	a->w[3] = ip4;
}

static __always_inline void addr_from_v6(union addr16 *a, struct bpf_sock_addr *ctx)
{
	a->w[0] = ctx->user_ip6[0];
	a->w[1] = ctx->user_ip6[1];
	a->w[2] = ctx->user_ip6[2];
	a->w[3] = ctx->user_ip6[3];
}

static __always_inline void addr_to_ctx(struct bpf_sock_addr *ctx, const union addr16 *a, int v4)
{
	if (v4) {
		ctx->user_ip4 = a->w[3];
		return;
	}
	ctx->user_ip6[0] = a->w[0];
	ctx->user_ip6[1] = a->w[1];
	ctx->user_ip6[2] = a->w[2];
	ctx->user_ip6[3] = a->w[3];
}

static __always_inline int refuse(int err)
{
	bpf_set_retval(-err);
	return 0;
}

/*
 * bind() guard: a NodePort is served on the node's NodePort addresses by the
 * tc programs, so a host process bound to that port would never see its
 * traffic. bind4/bind6 refuse such a bind with EADDRINUSE, in the node's own
 * network namespace only (pods share the cgroup, not the namespace). The
 * agent writes entry 0 with the namespace's cookie and the NodePort
 * addresses; count 0 turns the guard off.
 */
#define BIND_GUARD_ADDRS 16

struct bind_guard {
	__u64 netns_cookie;
	__u32 count;
	__u32 pad;
	union addr16 addrs[BIND_GUARD_ADDRS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct bind_guard);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpr_bind_guard_v1 SEC(".maps");

/* Whether an external frontend serves addr:port for proto. */
static __always_inline int is_frontend(const union addr16 *addr, __be16 port, __u8 proto)
{
	struct svc_key k = {};

	__builtin_memcpy(k.addr, addr->b, 16);
	k.port = port;
	k.proto = proto;
	k.scope = SCOPE_EXTERNAL;
	return bpf_map_lookup_elem(&kpr_svc_v1, &k) != NULL;
}

static __always_inline int bind_guard(struct bpf_sock_addr *ctx, int v4)
{
	__u32 zero = 0;
	struct bind_guard *g = bpf_map_lookup_elem(&kpr_bind_guard_v1, &zero);
	__be16 port = (__be16)ctx->user_port;
	union addr16 a;
	__u8 proto;

	if (!g || g->count == 0 || port == 0)
		return 1;
	if (ctx->protocol == IPPROTO_TCP_)
		proto = IPPROTO_TCP_;
	else if (ctx->protocol == IPPROTO_UDP_)
		proto = IPPROTO_UDP_;
	else
		return 1;
	if (bpf_get_netns_cookie(ctx) != g->netns_cookie)
		return 1;
	if (v4)
		addr_from_v4(&a, ctx->user_ip4);
	else
		addr_from_v6(&a, ctx);
	if (!(a.w[0] | a.w[1] | a.w[3]) && (a.w[2] == 0 || a.w[2] == bpf_htonl(0x0000ffff))) {
		/* A wildcard (an IPv6 one also takes IPv4): every NodePort address counts. */
		for (int i = 0; i < BIND_GUARD_ADDRS; i++) {
			if (i >= g->count)
				break;
			if (v4 && !addr_is_v4mapped(&g->addrs[i]))
				continue;
			if (is_frontend(&g->addrs[i], port, proto))
				return refuse(EADDRINUSE);
		}
		return 1;
	}
	return is_frontend(&a, port, proto) ? refuse(EADDRINUSE) : 1;
}

/* Whether a is inside a Service CIDR. Only asked when a is no VIP. */
static __always_inline int in_svc_cidr(const union addr16 *a)
{
	struct svc_cidr_key k = {};

	k.prefixlen = 128;
	__builtin_memcpy(k.addr, a->b, sizeof(k.addr));
	return bpf_map_lookup_elem(&kpr_svc_cidrs_v1, &k) != NULL;
}

static __always_inline struct backend *lookup_backend(__u32 backend_id, int v4)
{
	struct backend *be = bpf_map_lookup_elem(&kpr_backends_v1, &backend_id);
	union addr16 a;

	if (!be)
		return NULL;
	/* A v4 socket cannot be pointed at an IPv6 backend. */
	if (v4) {
		__builtin_memcpy(a.b, be->addr, sizeof(a.b));
		if (!addr_is_v4mapped(&a))
			return NULL;
	}
	return be;
}

static __always_inline struct backend *lookup_slot(struct svc_key *key, __u16 slot, int v4,
						   __u32 *backend_id)
{
	struct svc_value *sv;

	key->slot = slot;
	sv = bpf_map_lookup_elem(&kpr_svc_v1, key);
	if (!sv)
		return NULL;
	*backend_id = sv->backend_id;
	return lookup_backend(*backend_id, v4);
}

/*
 * sendmsg() runs per datagram, so it only rewrites an entry that changed; a
 * connect() (fresh) writes without asking.
 */
static __always_inline void record_sk_revnat(struct bpf_sock_addr *ctx, const union addr16 *be_addr,
					     __be16 be_port, const union addr16 *vip,
					     __be16 vip_port, __u32 svc_id, int fresh)
{
	struct sk_revnat_key k = {};
	struct sk_revnat_value v = {};
	struct sk_revnat_value *old;

	k.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(k.addr, be_addr->b, sizeof(k.addr));
	k.port = be_port;

	__builtin_memcpy(v.addr, vip->b, sizeof(v.addr));
	v.port = vip_port;
	v.svc_id = svc_id;

	old = fresh ? NULL : bpf_map_lookup_elem(&kpr_sk_revnat_v1, &k);
	if (old && old->svc_id == svc_id && old->port == vip_port) {
		union addr16 o;

		__builtin_memcpy(o.b, old->addr, sizeof(o.b));
		if (addr_equal(&o, vip))
			return;
	}
	if (bpf_map_update_elem(&kpr_sk_revnat_v1, &k, &v, BPF_ANY) == 0)
		port_mark(&kpr_sk_revnat_ports_v1, be_port);
}

static __always_inline void fill_sk_peer(struct sk_peer *p, const union addr16 *be_addr,
					 __be16 be_port, const union addr16 *vip, __be16 vip_port,
					 __u32 svc_id)
{
	__builtin_memcpy(p->be_addr, be_addr->b, sizeof(p->be_addr));
	p->be_port = be_port;
	__builtin_memcpy(p->vip_addr, vip->b, sizeof(p->vip_addr));
	p->vip_port = vip_port;
	p->svc_id = svc_id;
}

/*
 * connect() of a UDP socket whose slot in kpr_sk_conn_v1 is taken: it has one
 * peer from now on, kept in its storage. Falls back to the LRU map when the
 * storage cannot be allocated (its optmem limit).
 */
static __always_inline void record_sk_peer(struct bpf_sock_addr *ctx, const union addr16 *be_addr,
					   __be16 be_port, const union addr16 *vip,
					   __be16 vip_port, __u32 svc_id)
{
	struct sk_peer *p;
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		goto fallback;
	p = bpf_sk_storage_get(&kpr_sk_peer_v1, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!p)
		goto fallback;
	fill_sk_peer(p, be_addr, be_port, vip, vip_port, svc_id);
	return;
fallback:
	record_sk_revnat(ctx, be_addr, be_port, vip, vip_port, svc_id, 1);
}

/*
 * connect() to an address that is no VIP: a UDP socket connected to a VIP
 * before now talks to someone else, so its old peer must not be translated.
 * Its slot, if it has one, is found by the peer it is connected to until now
 * (a backend's port is marked; a fresh socket has none).
 */
static __always_inline void forget_sk_peer(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__be16 old;

	if (!sk)
		return;
	bpf_sk_storage_delete(&kpr_sk_peer_v1, sk); /* -ENOENT when it had none */
	old = (__be16)sk->dst_port;
	if (old && port_marked(&kpr_sk_revnat_ports_v1, old))
		put_sk_conn(bpf_get_socket_cookie(ctx));
}

/*
 * connect() of a TCP or UDP socket to a VIP: its slot, if free or already
 * its own (a TCP socket connecting again after a failed connect(), a UDP
 * socket connecting elsewhere). A TCP socket that connects to no VIP after a
 * failed connect() keeps its entry until it is released; the entry never
 * matches its new peer. A socket whose slot is taken keeps its entry in the
 * LRU map (TCP) or in its storage (UDP: it may live long and receive from
 * that peer all along, and the LRU map would evict it).
 */
static __always_inline void record_sk_conn(struct bpf_sock_addr *ctx, const union addr16 *be_addr,
					   __be16 be_port, const union addr16 *vip,
					   __be16 vip_port, __u32 svc_id, int udp)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct sk_conn *c = sk_conn_slot(cookie);

	if (c) {
		__u64 owner = __sync_val_compare_and_swap(&c->cookie, 0, cookie);

		if (owner == 0 || owner == cookie) {
			fill_sk_peer(&c->peer, be_addr, be_port, vip, vip_port, svc_id);
			port_mark(&kpr_sk_revnat_ports_v1, be_port);
			/* An older peer in its storage, from when its slot was taken. */
			if (udp && ctx->sk)
				bpf_sk_storage_delete(&kpr_sk_peer_v1, ctx->sk);
			return;
		}
	}
	if (udp)
		record_sk_peer(ctx, be_addr, be_port, vip, vip_port, svc_id);
	else
		record_sk_revnat(ctx, be_addr, be_port, vip, vip_port, svc_id, 1);
}

/*
 * Translates ctx's destination if it is a Service frontend. Returns the
 * program's return value: 1 to let the call proceed (translated or not), 0
 * after bpf_set_retval() to fail it.
 */
static __always_inline int sock_lb(struct bpf_sock_addr *ctx, int v4, int is_connect)
{
	struct svc_key key = {};
	struct svc_value *sv;
	struct backend *be = NULL;
	union addr16 vip, be_addr;
	__u32 proto = ctx->protocol;
	__be16 vip_port, be_port;
	__u32 backend_id = 0, svc_id, timeout;
	__u16 count, flags;
	__u32 now = 0;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;

	if (v4)
		addr_from_v4(&vip, ctx->user_ip4);
	else
		addr_from_v6(&vip, ctx);
	vip_port = (__be16)ctx->user_port;

	__builtin_memcpy(key.addr, vip.b, sizeof(key.addr));
	key.port = vip_port;
	key.proto = (__u8)proto;
	key.scope = SCOPE_SOCKET;

	sv = bpf_map_lookup_elem(&kpr_svc_v1, &key);
	if (!sv) {
		key.port = 0;
		key.proto = 0;
		if (bpf_map_lookup_elem(&kpr_svc_v1, &key))
			return refuse(ECONNREFUSED);
		/* An unallocated ClusterIP: kube-proxy drops it; like a frontend
		 * without usable endpoints (SVC_F_UNREACHABLE), fail at once. */
		if (in_svc_cidr(&vip))
			return refuse(EHOSTUNREACH);
		if (is_connect && proto == IPPROTO_UDP)
			forget_sk_peer(ctx);
		return 1;
	}

	/* Copy out: the entry can be replaced while we run. */
	count = sv->count;
	flags = sv->flags;
	svc_id = sv->svc_id;
	timeout = sv->affinity_timeout_sec;

	if (count == 0)
		return refuse((flags & SVC_F_UNREACHABLE) ? EHOSTUNREACH : ECONNREFUSED);

	if (timeout) {
		struct affinity_key ak = {};
		struct affinity_value *av;

		now = (__u32)(bpf_ktime_get_ns() / NSEC_PER_SEC);
		ak.netns_cookie = bpf_get_netns_cookie(ctx);
		ak.svc_id = svc_id;
		av = bpf_map_lookup_elem(&kpr_affinity_v1, &ak);
		if (av && now - av->last_used_sec <= timeout) {
			struct affinity_match_key mk = {};

			mk.svc_id = svc_id;
			mk.backend_id = av->backend_id;
			/* The backend may have left this Service while staying in another. */
			if (bpf_map_lookup_elem(&kpr_affinity_match_v1, &mk)) {
				backend_id = mk.backend_id;
				be = lookup_backend(backend_id, v4);
			}
		}
	}

	if (!be)
		be = lookup_slot(&key, (__u16)(bpf_get_prandom_u32() % count + 1), v4, &backend_id);
	/* A slot or backend vanished under a concurrent update: slot 1 always exists
	 * while count > 0 unless the whole Service is being replaced. */
	if (!be)
		be = lookup_slot(&key, 1, v4, &backend_id);
	if (!be)
		return refuse(ECONNREFUSED);

	__builtin_memcpy(be_addr.b, be->addr, sizeof(be_addr.b));
	be_port = be->port;

	if (timeout) {
		struct affinity_key ak = {};
		struct affinity_value av = {};

		ak.netns_cookie = bpf_get_netns_cookie(ctx);
		ak.svc_id = svc_id;
		av.backend_id = backend_id;
		av.last_used_sec = now;
		bpf_map_update_elem(&kpr_affinity_v1, &ak, &av, BPF_ANY);
	}

	addr_to_ctx(ctx, &be_addr, v4);
	ctx->user_port = (__u32)be_port;

	if (is_connect)
		record_sk_conn(ctx, &be_addr, be_port, &vip, vip_port, svc_id, proto == IPPROTO_UDP);
	else
		record_sk_revnat(ctx, &be_addr, be_port, &vip, vip_port, svc_id, 0);
	return 1;
}

/*
 * Whether p, a connected socket's entry, is for this peer; if so, the VIP it
 * stands for goes to vip, vip_port and svc_id.
 */
static __always_inline int sk_peer_match(const struct sk_peer *p, const union addr16 *peer,
					 __be16 port, union addr16 *vip, __be16 *vip_port,
					 __u32 *svc_id)
{
	union addr16 cur;

	if (p->be_port != port)
		return 0;
	__builtin_memcpy(cur.b, p->be_addr, sizeof(cur.b));
	if (!addr_equal(&cur, peer))
		return 0;
	__builtin_memcpy(vip->b, p->vip_addr, sizeof(vip->b));
	*vip_port = p->vip_port;
	*svc_id = p->svc_id;
	return 1;
}

/* Rewrites a backend source/peer address back to the VIP the socket used. */
static __always_inline int sock_revnat(struct bpf_sock_addr *ctx, int v4)
{
	struct sk_revnat_key k = {};
	struct sk_revnat_value *v;
	struct revnat *rn;
	struct sk_conn *c;
	struct sk_peer *p;
	struct bpf_sock *sk;
	union addr16 peer, vip, cur;
	__be16 port, vip_port;
	__u32 svc_id;

	if (v4)
		addr_from_v4(&peer, ctx->user_ip4);
	else
		addr_from_v6(&peer, ctx);

	port = (__be16)ctx->user_port;

	sk = ctx->sk;
	p = sk && ctx->protocol == IPPROTO_UDP ? bpf_sk_storage_get(&kpr_sk_peer_v1, sk, 0, 0) : NULL;
	if (p && sk_peer_match(p, &peer, port, &vip, &vip_port, &svc_id))
		goto found;

	if (!port_marked(&kpr_sk_revnat_ports_v1, port))
		return 1;

	k.cookie = bpf_get_socket_cookie(ctx);
	c = sk_conn_owned(k.cookie);
	if (c && sk_peer_match(&c->peer, &peer, port, &vip, &vip_port, &svc_id))
		goto found;
	__builtin_memcpy(k.addr, peer.b, sizeof(k.addr));
	k.port = port;

	v = bpf_map_lookup_elem(&kpr_sk_revnat_v1, &k);
	if (!v)
		return 1;
	__builtin_memcpy(vip.b, v->addr, sizeof(vip.b));
	vip_port = v->port;
	svc_id = v->svc_id;

found:
	/* The Service (or its frontend) may be gone: then show the truth. */
	rn = bpf_map_lookup_elem(&kpr_revnat_v1, &svc_id);
	if (!rn || rn->port != vip_port)
		return 1;
	__builtin_memcpy(cur.b, rn->addr, sizeof(cur.b));
	if (!addr_equal(&cur, &vip))
		return 1;
	if (v4 && !addr_is_v4mapped(&vip))
		return 1;

	addr_to_ctx(ctx, &vip, v4);
	ctx->user_port = (__u32)vip_port;
	return 1;
}

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	return sock_lb(ctx, 1, 1);
}

SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
	return sock_lb(ctx, 0, 1);
}

SEC("cgroup/sendmsg4")
int sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock_lb(ctx, 1, 0);
}

SEC("cgroup/sendmsg6")
int sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock_lb(ctx, 0, 0);
}

SEC("cgroup/recvmsg4")
int recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock_revnat(ctx, 1);
}

SEC("cgroup/recvmsg6")
int recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock_revnat(ctx, 0);
}

SEC("cgroup/getpeername4")
int getpeername4(struct bpf_sock_addr *ctx)
{
	return sock_revnat(ctx, 1);
}

SEC("cgroup/getpeername6")
int getpeername6(struct bpf_sock_addr *ctx)
{
	return sock_revnat(ctx, 0);
}

/*
 * A socket's release (its last close()): it gives its kpr_sk_conn_v1 slot
 * back. Runs for every TCP and UDP socket in the cgroup, so a socket whose
 * peer port no entry has stops at the port mark. A TCP peer port of 0 is no
 * answer: a refused connect() clears it (tcp_disconnect); a UDP socket without
 * a peer port (never connected, or disconnected with AF_UNSPEC) stops there.
 * Not caught: a TCP socket whose connect() to a VIP failed and which then
 * connected again, to a port that is no backend's, and a UDP socket
 * disconnected with AF_UNSPEC after connecting to a VIP, keep their slot; the
 * sockets that would have used it later keep their entries in the LRU map or
 * in their storage instead.
 */
SEC("cgroup/sock_release")
int sock_release(struct bpf_sock *sk)
{
	__be16 port = (__be16)sk->dst_port;

	if (sk->protocol == IPPROTO_TCP) {
		if (port && !port_marked(&kpr_sk_revnat_ports_v1, port))
			return 1;
	} else if (sk->protocol != IPPROTO_UDP || !port_marked(&kpr_sk_revnat_ports_v1, port)) {
		return 1;
	}
	put_sk_conn(bpf_get_socket_cookie(sk));
	return 1;
}

SEC("cgroup/bind4")
int bind4(struct bpf_sock_addr *ctx)
{
	return bind_guard(ctx, 1);
}

SEC("cgroup/bind6")
int bind6(struct bpf_sock_addr *ctx)
{
	return bind_guard(ctx, 0);
}

char __license[] SEC("license") = "Dual BSD/GPL";
