package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// The bind() guard: in the node's own network namespace a TCP or UDP port that an external
// frontend serves cannot be bound, on that address or on a wildcard, as long as a NodePort
// address is given; other ports, other protocols, other addresses, other namespaces (pods
// share the cgroup) and a switched-off guard are left alone.
func TestBindGuard(t *testing.T) {
	e := newTestEnv(t)
	d := e.load()
	node4, node6 := netip.MustParseAddr("198.18.0.11"), netip.MustParseAddr("fd6b:7072::11")
	e.ip("link", "add", "ext0", "type", "veth", "peer", "name", "ext0p")
	e.ip("link", "set", "ext0p", "up")
	e.ip("link", "set", "ext0", "up")
	e.ip("addr", "add", node4.String()+"/24", "dev", "ext0")
	e.ip("-6", "addr", "add", node6.String()+"/64", "dev", "ext0", "nodad")
	for i, k := range []ServiceKey{
		{Addr: node4, Port: 30080, Proto: ProtoTCP, Scope: ScopeExternal},
		{Addr: node6, Port: 30080, Proto: ProtoTCP, Scope: ScopeExternal},
		{Addr: node4, Port: 30053, Proto: ProtoUDP, Scope: ScopeExternal},
		{Addr: node4, Port: 30099, Proto: ProtoTCP, Scope: ScopeSocket}, // not external
	} {
		must(t, d.Maps.UpsertService(k, Service{ID: uint32(70 + i)}, 0))
	}
	cookie := func(env *testEnv) uint64 {
		var c uint64
		must(t, env.do(func() error {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			c, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
			return err
		}))
		return c
	}
	must(t, d.Maps.SetBindGuard(cookie(e), []netip.Addr{node4, node6}))

	bind := func(env *testEnv, proto Proto, ap string) error {
		a := netip.MustParseAddrPort(ap)
		return env.do(func() error {
			family, sotype := unix.AF_INET6, unix.SOCK_STREAM
			if a.Addr().Is4() {
				family = unix.AF_INET
			}
			if proto == ProtoUDP {
				sotype = unix.SOCK_DGRAM
			}
			fd, err := unix.Socket(family, sotype|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			return unix.Bind(fd, sockaddr(a, family))
		})
	}
	pod := &testEnv{t: t, netns: makeNetns(t)}
	pod.ip("link", "set", "lo", "up")
	for _, c := range []struct {
		env   *testEnv
		proto Proto
		addr  string
		want  error
	}{
		{e, ProtoTCP, "0.0.0.0:30080", unix.EADDRINUSE},
		{e, ProtoTCP, "198.18.0.11:30080", unix.EADDRINUSE},
		{e, ProtoTCP, "[::]:30080", unix.EADDRINUSE},
		{e, ProtoTCP, "[fd6b:7072::11]:30080", unix.EADDRINUSE},
		{e, ProtoTCP, "[::ffff:198.18.0.11]:30080", unix.EADDRINUSE},
		{e, ProtoUDP, "0.0.0.0:30053", unix.EADDRINUSE},
		{e, ProtoTCP, "127.0.0.1:30080", nil}, // not a NodePort address
		{e, ProtoTCP, "0.0.0.0:30081", nil},
		{e, ProtoUDP, "0.0.0.0:30080", nil}, // the NodePort is TCP only
		{e, ProtoTCP, "0.0.0.0:30099", nil}, // a socket-scope entry
		{e, ProtoTCP, "0.0.0.0:0", nil},
		{pod, ProtoTCP, "0.0.0.0:30080", nil}, // another namespace in the same cgroup
	} {
		name := fmt.Sprintf("%s %s", c.proto, c.addr)
		if c.env == pod {
			name += " in another namespace"
		}
		if err := bind(c.env, c.proto, c.addr); !errors.Is(err, c.want) && !(c.want == nil && err == nil) {
			t.Errorf("bind %s: %v, want %v", name, err, c.want)
		}
	}

	must(t, d.Maps.SetBindGuard(cookie(e), nil))
	if err := bind(e, ProtoTCP, "0.0.0.0:30080"); err != nil {
		t.Errorf("bind with the guard off: %v", err)
	}
}
