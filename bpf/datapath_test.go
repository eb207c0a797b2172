package bpf

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

var (
	tcpA = netip.AddrPortFrom(backendA, 8080)
	tcpB = netip.AddrPortFrom(backendB, 8081)
	udpA = netip.AddrPortFrom(backendA, 5353)
	udpB = netip.AddrPortFrom(backendB, 5354)
	tcp6 = netip.AddrPortFrom(backend6, 8080)
	udp6 = netip.AddrPortFrom(backend6, 5353)
)

// Backend and service IDs used by programServices.
const (
	beTCPA, beTCPB, beUDPA, beUDPB, beTCP6, beUDP6 = 1, 2, 3, 4, 5, 6

	svcTCP, svcUDP, svcTCP6, svcUDP6, svcAffinity = 1, 2, 3, 4, 5
)

var (
	keyTCP  = ServiceKey{Addr: vip4, Port: 80, Proto: ProtoTCP}
	keyUDP  = ServiceKey{Addr: vip4, Port: 53, Proto: ProtoUDP}
	keyWC   = ServiceKey{Addr: vip4}
	keyTCP6 = ServiceKey{Addr: vip6, Port: 80, Proto: ProtoTCP}
	keyUDP6 = ServiceKey{Addr: vip6, Port: 53, Proto: ProtoUDP}
	keyWC6  = ServiceKey{Addr: vip6}
)

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// programServices writes the standard test Services, in the reconciler's
// order: backends, service slots, reverse NAT.
func programServices(t testing.TB, m *LBMaps) {
	t.Helper()
	backends := map[uint32]Backend{
		beTCPA: {tcpA.Addr(), tcpA.Port(), ProtoTCP},
		beTCPB: {tcpB.Addr(), tcpB.Port(), ProtoTCP},
		beUDPA: {udpA.Addr(), udpA.Port(), ProtoUDP},
		beUDPB: {udpB.Addr(), udpB.Port(), ProtoUDP},
		beTCP6: {tcp6.Addr(), tcp6.Port(), ProtoTCP},
		beUDP6: {udp6.Addr(), udp6.Port(), ProtoUDP},
	}
	for id, b := range backends {
		must(t, m.UpsertBackend(id, b))
	}
	must(t, m.UpsertService(keyTCP, Service{ID: svcTCP, Backends: []uint32{beTCPA, beTCPB}}, 0))
	must(t, m.UpsertService(keyUDP, Service{ID: svcUDP, Backends: []uint32{beUDPA, beUDPB}}, 0))
	must(t, m.UpsertService(keyWC, Service{}, 0))
	must(t, m.UpsertService(keyTCP6, Service{ID: svcTCP6, Backends: []uint32{beTCP6}}, 0))
	must(t, m.UpsertService(keyUDP6, Service{ID: svcUDP6, Backends: []uint32{beUDP6}}, 0))
	must(t, m.UpsertService(keyWC6, Service{}, 0))
	for id, k := range map[uint32]ServiceKey{svcTCP: keyTCP, svcUDP: keyUDP, svcTCP6: keyTCP6, svcUDP6: keyUDP6} {
		must(t, m.UpsertRevNat(id, RevNat{Addr: k.Addr, Port: k.Port}))
	}
}

func startAllServers(e *testEnv) {
	e.startServers([]netip.AddrPort{tcpA, tcpB, tcp6}, []netip.AddrPort{udpA, udpB, udp6})
}

// mapped returns ap with its address as ::ffff:a.b.c.d, as a v6 socket sees it.
func mapped(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16(ap.Addr().As16()), ap.Port())
}

// spreadsOver runs attempt at most 200 times and fails unless every backend
// in want answered; check validates each exchange.
func spreadsOver(t *testing.T, want []netip.AddrPort, attempt func() (exchange, error), check func(exchange)) {
	t.Helper()
	seen := map[string]int{}
	deadline := time.Now().Add(30 * time.Second)
	for i := 0; i < 200 && time.Now().Before(deadline); i++ {
		ex, err := attempt()
		if err != nil {
			t.Fatalf("attempt %d: %v", i, err)
		}
		check(ex)
		seen[ex.backend]++
		if len(seen) == len(want) {
			break
		}
	}
	for _, w := range want {
		if seen[w.String()] == 0 {
			t.Fatalf("backend %s never answered; answers: %v", w, seen)
		}
	}
	if len(seen) != len(want) {
		t.Fatalf("unexpected backends answered: %v, want %v", seen, want)
	}
}

func wantErrno(t *testing.T, what string, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("%s: got error %v, want %v", what, err, want)
	}
}

func TestSocketLB(t *testing.T) {
	e := newTestEnv(t)
	d := e.load()
	startAllServers(e)
	programServices(t, d.Maps)

	t.Run("tcp connect spreads over backends", func(t *testing.T) {
		spreadsOver(t, []netip.AddrPort{tcpA, tcpB},
			func() (exchange, error) { return e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 80)) },
			func(ex exchange) {
				if ex.peer != netip.AddrPortFrom(vip4, 80) {
					t.Fatalf("getpeername = %s, want the VIP %s:80", ex.peer, vip4)
				}
			})
	})

	t.Run("run statistics count the connects", func(t *testing.T) {
		stats, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
		if err != nil {
			t.Skipf("BPF_ENABLE_STATS: %v", err)
		}
		defer stats.Close()
		before, err := RunStats(e.pinDir)
		must(t, err)
		const n = 5
		for range n {
			if _, err := e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 80)); err != nil {
				t.Fatal(err)
			}
		}
		after, err := RunStats(e.pinDir)
		must(t, err)
		runs := after["connect4"].RunCount - before["connect4"].RunCount
		took := after["connect4"].Runtime - before["connect4"].Runtime
		// Other processes in the test's cgroup may connect too, never fewer.
		if runs < n || took <= 0 {
			t.Fatalf("connect4 ran %d times for %v over %d connects, want at least %d runs and some time", runs, took, n, n)
		}
		if got := after["connect6"].RunCount - before["connect6"].RunCount; got != 0 {
			t.Errorf("connect6 ran %d times over IPv4 connects", got)
		}
	})

	t.Run("udp connected", func(t *testing.T) {
		spreadsOver(t, []netip.AddrPort{udpA, udpB},
			func() (exchange, error) { return e.udpConnected(unix.AF_INET, netip.AddrPortFrom(vip4, 53)) },
			func(ex exchange) {
				want := netip.AddrPortFrom(vip4, 53)
				if ex.peer != want || ex.from != want {
					t.Fatalf("getpeername = %s, recvfrom source = %s, want the VIP %s", ex.peer, ex.from, want)
				}
			})
	})

	t.Run("udp unconnected", func(t *testing.T) {
		spreadsOver(t, []netip.AddrPort{udpA, udpB},
			func() (exchange, error) { return e.udpUnconnected(unix.AF_INET, netip.AddrPortFrom(vip4, 53)) },
			func(ex exchange) {
				if want := netip.AddrPortFrom(vip4, 53); ex.from != want {
					t.Fatalf("recvfrom source = %s, want the VIP %s", ex.from, want)
				}
			})
	})

	t.Run("ipv6", func(t *testing.T) {
		ex, err := e.dialTCP(unix.AF_INET6, netip.AddrPortFrom(vip6, 80))
		must(t, err)
		if ex.backend != tcp6.String() || ex.peer != netip.AddrPortFrom(vip6, 80) {
			t.Fatalf("tcp6: backend %s peer %s, want %s and the VIP", ex.backend, ex.peer, tcp6)
		}
		ex, err = e.udpUnconnected(unix.AF_INET6, netip.AddrPortFrom(vip6, 53))
		must(t, err)
		if ex.backend != udp6.String() || ex.from != netip.AddrPortFrom(vip6, 53) {
			t.Fatalf("udp6: backend %s source %s, want %s and the VIP", ex.backend, ex.from, udp6)
		}
		ex, err = e.udpConnected(unix.AF_INET6, netip.AddrPortFrom(vip6, 53))
		must(t, err)
		if want := netip.AddrPortFrom(vip6, 53); ex.backend != udp6.String() || ex.peer != want || ex.from != want {
			t.Fatalf("udp6 connected: backend %s peer %s source %s, want %s and the VIP", ex.backend, ex.peer, ex.from, udp6)
		}
	})

	t.Run("v4-mapped VIP from a v6 socket", func(t *testing.T) {
		vip := netip.AddrPortFrom(vip4, 80)
		spreadsOver(t, []netip.AddrPort{tcpA, tcpB},
			func() (exchange, error) { return e.dialTCP(unix.AF_INET6, vip) },
			func(ex exchange) {
				if ex.peer != mapped(vip) {
					t.Fatalf("getpeername = %s, want %s", ex.peer, mapped(vip))
				}
			})
		udpVIP := netip.AddrPortFrom(vip4, 53)
		spreadsOver(t, []netip.AddrPort{udpA, udpB},
			func() (exchange, error) { return e.udpUnconnected(unix.AF_INET6, udpVIP) },
			func(ex exchange) {
				if ex.from != mapped(udpVIP) {
					t.Fatalf("recvfrom source = %s, want %s", ex.from, mapped(udpVIP))
				}
			})
	})

	t.Run("refusals", func(t *testing.T) {
		noBackends := ServiceKey{Addr: vip4Other, Port: 80, Proto: ProtoTCP}
		must(t, d.Maps.UpsertService(noBackends, Service{ID: 10}, 0))
		start := time.Now()
		_, err := e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4Other, 80))
		wantErrno(t, "count 0", err, unix.ECONNREFUSED)
		if el := time.Since(start); el > 500*time.Millisecond {
			t.Errorf("refusal took %v, want it at once", el)
		}

		must(t, d.Maps.UpsertService(noBackends, Service{ID: 10, Flags: FlagUnreachable}, 0))
		_, err = e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4Other, 80))
		wantErrno(t, "count 0, unreachable", err, unix.EHOSTUNREACH)
		_, err = e.dialTCP(unix.AF_INET6, mapped(netip.AddrPortFrom(vip4Other, 80)))
		wantErrno(t, "count 0, unreachable, v6 socket", err, unix.EHOSTUNREACH)

		noBackendsUDP := ServiceKey{Addr: vip4Other, Port: 53, Proto: ProtoUDP}
		must(t, d.Maps.UpsertService(noBackendsUDP, Service{ID: 11}, 0))
		_, err = e.udpUnconnected(unix.AF_INET, netip.AddrPortFrom(vip4Other, 53))
		wantErrno(t, "udp sendto, count 0", err, unix.ECONNREFUSED)

		_, err = e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 81))
		wantErrno(t, "port not served (wildcard)", err, unix.ECONNREFUSED)
		_, err = e.udpUnconnected(unix.AF_INET, netip.AddrPortFrom(vip4, 54))
		wantErrno(t, "udp port not served (wildcard)", err, unix.ECONNREFUSED)
		_, err = e.dialTCP(unix.AF_INET6, netip.AddrPortFrom(vip6, 81))
		wantErrno(t, "v6 port not served (wildcard)", err, unix.ECONNREFUSED)

		// Not a VIP: untouched, and the namespace has no route for it.
		_, err = e.dialTCP(unix.AF_INET, netip.AddrPortFrom(netip.MustParseAddr("10.96.0.99"), 80))
		wantErrno(t, "not a VIP", err, unix.ENETUNREACH)

		must(t, d.Maps.DeleteService(noBackends, 0))
		must(t, d.Maps.DeleteService(noBackendsUDP, 0))
	})

	t.Run("affinity", func(t *testing.T) {
		k := ServiceKey{Addr: vip4, Port: 90, Proto: ProtoTCP}
		must(t, d.Maps.UpsertAffinityMatch(svcAffinity, beTCPA))
		must(t, d.Maps.UpsertAffinityMatch(svcAffinity, beTCPB))
		must(t, d.Maps.UpsertService(k, Service{ID: svcAffinity, AffinityTimeoutSec: 600, Backends: []uint32{beTCPA, beTCPB}}, 0))
		must(t, d.Maps.UpsertRevNat(svcAffinity, RevNat{Addr: vip4, Port: 90}))
		first := ""
		for i := range 30 {
			ex, err := e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 90))
			must(t, err)
			if i == 0 {
				first = ex.backend
			} else if ex.backend != first {
				t.Fatalf("connection %d went to %s, affinity pinned %s", i, ex.backend, first)
			}
		}
		// The affinity entry names the backend that was used.
		var key sockAffinityKey
		var val sockAffinityValue
		found := false
		it := d.Maps.affinity.Iterate()
		for it.Next(&key, &val) {
			if key.SvcId == svcAffinity {
				found = true
				wantID := uint32(beTCPA)
				if first == tcpB.String() {
					wantID = beTCPB
				}
				if val.BackendId != wantID {
					t.Errorf("affinity entry backend %d, want %d", val.BackendId, wantID)
				}
			}
		}
		must(t, it.Err())
		if !found {
			t.Fatal("no affinity entry for the service")
		}
		must(t, d.Maps.DeleteService(k, 2))
		must(t, d.Maps.DeleteRevNat(svcAffinity))
		must(t, d.Maps.DeleteAffinityMatch(svcAffinity, beTCPA))
		must(t, d.Maps.DeleteAffinityMatch(svcAffinity, beTCPB))
	})

	t.Run("missing slot falls back to slot 1", func(t *testing.T) {
		// What a concurrent update can leave for a moment: slot 0 says 2,
		// slot 2 is gone.
		k := ServiceKey{Addr: vip4, Port: 91, Proto: ProtoTCP}
		must(t, d.Maps.UpsertService(k, Service{ID: 20, Backends: []uint32{beTCPB, beTCPA}}, 0))
		key := svcKey(k, 2)
		must(t, d.Maps.svc.Delete(&key))
		for i := range 20 {
			ex, err := e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 91))
			must(t, err)
			if ex.backend != tcpB.String() {
				t.Fatalf("connection %d went to %s, want slot 1's %s", i, ex.backend, tcpB)
			}
		}
		// Slot 1's backend gone too: refuse rather than leak to the VIP.
		must(t, d.Maps.UpsertService(k, Service{ID: 20, Backends: []uint32{99}}, 2))
		_, err := e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 91))
		wantErrno(t, "no usable backend", err, unix.ECONNREFUSED)
		must(t, d.Maps.DeleteService(k, 2))
	})

	t.Run("affinity to a deleted backend moves on", func(t *testing.T) {
		const tmpBackend = 30
		must(t, d.Maps.UpsertBackend(tmpBackend, Backend{tcpA.Addr(), tcpA.Port(), ProtoTCP}))
		k := ServiceKey{Addr: vip4, Port: 92, Proto: ProtoTCP}
		must(t, d.Maps.UpsertAffinityMatch(21, tmpBackend))
		must(t, d.Maps.UpsertService(k, Service{ID: 21, AffinityTimeoutSec: 600, Backends: []uint32{tmpBackend}}, 0))
		ex, err := e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 92))
		must(t, err)
		if ex.backend != tcpA.String() {
			t.Fatalf("went to %s, want %s", ex.backend, tcpA)
		}
		must(t, d.Maps.UpsertAffinityMatch(21, beTCPB))
		must(t, d.Maps.UpsertService(k, Service{ID: 21, AffinityTimeoutSec: 600, Backends: []uint32{beTCPB}}, 1))
		must(t, d.Maps.DeleteAffinityMatch(21, tmpBackend))
		must(t, d.Maps.DeleteBackend(tmpBackend))
		for i := range 10 {
			ex, err := e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 92))
			must(t, err)
			if ex.backend != tcpB.String() {
				t.Fatalf("connection %d went to %s, want %s", i, ex.backend, tcpB)
			}
		}
		must(t, d.Maps.DeleteService(k, 1))
		must(t, d.Maps.DeleteAffinityMatch(21, beTCPB))
	})

	t.Run("affinity does not follow a backend that left the service but serves another", func(t *testing.T) {
		// Backend IDs are shared between Services: beTCPA serves both A and B. When it
		// leaves A it stays in the backend map for B, so "the remembered backend still
		// exists" must not be enough for A's clients to keep using it.
		const svcA, svcB = 22, 23
		kA := ServiceKey{Addr: vip4, Port: 93, Proto: ProtoTCP}
		kB := ServiceKey{Addr: vip4, Port: 94, Proto: ProtoTCP}
		vipA, vipB := netip.AddrPortFrom(vip4, 93), netip.AddrPortFrom(vip4, 94)
		must(t, d.Maps.UpsertAffinityMatch(svcA, beTCPA))
		must(t, d.Maps.UpsertAffinityMatch(svcB, beTCPA))
		must(t, d.Maps.UpsertService(kA, Service{ID: svcA, AffinityTimeoutSec: 600, Backends: []uint32{beTCPA}}, 0))
		must(t, d.Maps.UpsertService(kB, Service{ID: svcB, AffinityTimeoutSec: 600, Backends: []uint32{beTCPA}}, 0))
		must(t, d.Maps.UpsertRevNat(svcA, RevNat{Addr: vip4, Port: 93}))
		must(t, d.Maps.UpsertRevNat(svcB, RevNat{Addr: vip4, Port: 94}))
		defer func() {
			must(t, d.Maps.DeleteService(kA, 1))
			must(t, d.Maps.DeleteService(kB, 1))
			must(t, d.Maps.DeleteRevNat(svcA))
			must(t, d.Maps.DeleteRevNat(svcB))
			for _, am := range []AffinityMatch{{svcA, beTCPA}, {svcA, beTCPB}, {svcB, beTCPA}} {
				must(t, d.Maps.DeleteAffinityMatch(am.SvcID, am.BackendID))
			}
		}()
		dialWant := func(what string, vip, want netip.AddrPort) {
			t.Helper()
			ex, err := e.dialTCP(unix.AF_INET, vip)
			must(t, err)
			if ex.backend != want.String() || ex.peer != vip {
				t.Fatalf("%s: backend %s peer %s, want %s and the VIP %s", what, ex.backend, ex.peer, want, vip)
			}
		}
		dialWant("A before the change", vipA, tcpA)
		dialWant("B before the change", vipB, tcpA)
		if id, ok := affinityBackend(t, d.Maps, svcA); !ok || id != beTCPA {
			t.Fatalf("affinity entry of A: backend %d (present %v), want %d", id, ok, beTCPA)
		}

		// beTCPA leaves A, in the reconciler's order: the new backend's pair, the
		// slots, then the old pair.
		must(t, d.Maps.UpsertAffinityMatch(svcA, beTCPB))
		must(t, d.Maps.UpsertService(kA, Service{ID: svcA, AffinityTimeoutSec: 600, Backends: []uint32{beTCPB}}, 1))
		// The pair, not the slots, decides: until it goes, the remembered backend is
		// still used. This also proves the client really is pinned, so the checks
		// below would catch a datapath that ignored the match map.
		dialWant("A with the old pair still present", vipA, tcpA)
		must(t, d.Maps.DeleteAffinityMatch(svcA, beTCPA))

		for i := range 20 {
			dialWant(fmt.Sprintf("A, connection %d after the change", i), vipA, tcpB)
		}
		if id, ok := affinityBackend(t, d.Maps, svcA); !ok || id != beTCPB {
			t.Fatalf("affinity entry of A after the change: backend %d (present %v), want %d", id, ok, beTCPB)
		}
		for i := range 5 {
			dialWant(fmt.Sprintf("B, connection %d after the change", i), vipB, tcpA)
		}
	})

	t.Run("delete service stops translation", func(t *testing.T) {
		// A connected UDP socket made while the Service exists ...
		var fd int
		err := e.do(func() error {
			var err error
			fd, err = socket(unix.AF_INET, unix.SOCK_DGRAM)
			if err != nil {
				return err
			}
			return unix.Connect(fd, sockaddr(netip.AddrPortFrom(vip4, 53), unix.AF_INET))
		})
		must(t, err)
		defer unix.Close(fd)

		must(t, d.Maps.DeleteService(keyTCP, 2))
		must(t, d.Maps.DeleteService(keyUDP, 2))
		must(t, d.Maps.DeleteService(keyWC, 0))
		must(t, d.Maps.DeleteRevNat(svcTCP))
		must(t, d.Maps.DeleteRevNat(svcUDP))

		_, err = e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 80))
		wantErrno(t, "connect to deleted VIP", err, unix.ENETUNREACH)
		_, err = e.udpUnconnected(unix.AF_INET, netip.AddrPortFrom(vip4, 53))
		wantErrno(t, "sendto deleted VIP", err, unix.ENETUNREACH)

		// ... now shows its real peer: its frontend is gone.
		sa, err := unix.Getpeername(fd)
		must(t, err)
		if p := addrPortOf(sa); p != udpA && p != udpB {
			t.Fatalf("getpeername after delete = %s, want a backend", p)
		}
		svcs, err := d.Maps.Services()
		must(t, err)
		for _, k := range []ServiceKey{keyTCP, keyUDP, keyWC} {
			if _, ok := svcs[k]; ok {
				t.Errorf("%s still dumped after delete", k)
			}
		}
	})
}

// TestServiceCIDRs checks kube-proxy's "packet to unallocated cluster ip -> DROP": an address
// inside a Service CIDR that no frontend owns fails at once with EHOSTUNREACH, while addresses
// outside pass untouched and frontends inside are still translated.
func TestServiceCIDRs(t *testing.T) {
	e := newTestEnv(t)
	d := e.load()
	startAllServers(e)
	programServices(t, d.Maps)
	cidr4, cidr6 := netip.MustParsePrefix("10.96.0.0/16"), netip.MustParsePrefix("fd6b:7072:96::/112")
	must(t, d.Maps.SetServiceCIDRs([]netip.Prefix{cidr4, cidr6}))

	unalloc4 := netip.AddrPortFrom(netip.MustParseAddr("10.96.200.7"), 80)
	unalloc6 := netip.AddrPortFrom(netip.MustParseAddr("fd6b:7072:96::ffff"), 80)
	outside4 := netip.AddrPortFrom(netip.MustParseAddr("10.97.0.1"), 80)
	outside6 := netip.AddrPortFrom(netip.MustParseAddr("fd6b:7072:97::1"), 80)

	type call struct {
		name string
		fn   func() (exchange, error)
	}
	calls := func(dst netip.AddrPort) []call {
		fam := familyOf(dst)
		cs := []call{
			{"tcp connect", func() (exchange, error) { return e.dialTCP(fam, dst) }},
			{"udp connect", func() (exchange, error) { return e.udpConnected(fam, dst) }},
			{"udp sendto", func() (exchange, error) { return e.udpUnconnected(fam, dst) }},
		}
		if fam == unix.AF_INET {
			cs = append(cs,
				call{"tcp connect from a v6 socket", func() (exchange, error) { return e.dialTCP(unix.AF_INET6, mapped(dst)) }},
				call{"udp sendto from a v6 socket", func() (exchange, error) { return e.udpUnconnected(unix.AF_INET6, mapped(dst)) }})
		}
		return cs
	}
	expect := func(t *testing.T, dst netip.AddrPort, want error) {
		t.Helper()
		for _, c := range calls(dst) {
			start := time.Now()
			_, err := c.fn()
			wantErrno(t, fmt.Sprintf("%s to %s", c.name, dst), err, want)
			if el := time.Since(start); el > 500*time.Millisecond {
				t.Errorf("%s to %s: failed after %v, want at once", c.name, dst, el)
			}
		}
	}

	t.Run("unallocated address inside a Service CIDR is unreachable", func(t *testing.T) {
		expect(t, unalloc4, unix.EHOSTUNREACH)
		expect(t, unalloc6, unix.EHOSTUNREACH)
		// Network and broadcast addresses of the CIDR are inside it too.
		expect(t, netip.AddrPortFrom(netip.MustParseAddr("10.96.255.255"), 53), unix.EHOSTUNREACH)
	})

	t.Run("address outside every Service CIDR is untouched", func(t *testing.T) {
		// The test namespace has no route for them.
		expect(t, outside4, unix.ENETUNREACH)
		expect(t, outside6, unix.ENETUNREACH)
	})

	t.Run("frontends inside the CIDR still translate", func(t *testing.T) {
		ex, err := e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 80))
		must(t, err)
		if ex.peer != netip.AddrPortFrom(vip4, 80) {
			t.Fatalf("getpeername = %s, want the VIP", ex.peer)
		}
		ex, err = e.udpUnconnected(unix.AF_INET6, netip.AddrPortFrom(vip6, 53))
		must(t, err)
		if ex.backend != udp6.String() || ex.from != netip.AddrPortFrom(vip6, 53) {
			t.Fatalf("udp6: backend %s source %s, want %s and the VIP", ex.backend, ex.from, udp6)
		}
		// A port the VIP does not serve is still "refused", not "unreachable".
		_, err = e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 81))
		wantErrno(t, "port not served", err, unix.ECONNREFUSED)
		_, err = e.udpUnconnected(unix.AF_INET6, netip.AddrPortFrom(vip6, 54))
		wantErrno(t, "v6 udp port not served", err, unix.ECONNREFUSED)
	})

	t.Run("replacing the set", func(t *testing.T) {
		narrow := netip.MustParsePrefix("10.96.200.0/24")
		must(t, d.Maps.SetServiceCIDRs([]netip.Prefix{narrow}))
		got, err := d.Maps.ServiceCIDRs()
		must(t, err)
		if !slices.Equal(got, []netip.Prefix{narrow}) {
			t.Fatalf("ServiceCIDRs() = %v, want %v", got, narrow)
		}
		expect(t, unalloc4, unix.EHOSTUNREACH)
		expect(t, netip.AddrPortFrom(netip.MustParseAddr("10.96.1.7"), 80), unix.ENETUNREACH)
		expect(t, unalloc6, unix.ENETUNREACH)
		ex, err := e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 80))
		must(t, err)
		if ex.peer != netip.AddrPortFrom(vip4, 80) {
			t.Fatalf("getpeername = %s, want the VIP", ex.peer)
		}

		must(t, d.Maps.SetServiceCIDRs(nil))
		got, err = d.Maps.ServiceCIDRs()
		must(t, err)
		if len(got) != 0 {
			t.Fatalf("ServiceCIDRs() after clearing = %v", got)
		}
		expect(t, unalloc4, unix.ENETUNREACH)
	})
}

// affinityBackend returns the backend the (only) affinity entry of svcID names.
func affinityBackend(t *testing.T, m *LBMaps, svcID uint32) (uint32, bool) {
	t.Helper()
	var key sockAffinityKey
	var val sockAffinityValue
	id, found := uint32(0), false
	it := m.affinity.Iterate()
	for it.Next(&key, &val) {
		if key.SvcId == svcID {
			if found {
				t.Fatalf("several affinity entries for service %d", svcID)
			}
			id, found = val.BackendId, true
		}
	}
	must(t, it.Err())
	return id, found
}

// pinnedLinks returns link ID and program ID of every pinned link.
func pinnedLinks(t *testing.T, pinDir string) map[string][2]uint32 {
	t.Helper()
	out := map[string][2]uint32{}
	for _, h := range hooks {
		l, err := link.LoadPinnedLink(filepath.Join(pinDir, linksDir, h.name), nil)
		if err != nil {
			t.Fatalf("pinned link %s: %v", h.name, err)
		}
		info, err := l.Info()
		l.Close()
		must(t, err)
		out[h.name] = [2]uint32{uint32(info.ID), uint32(info.Program)}
	}
	return out
}

func TestRestartAndCleanup(t *testing.T) {
	e := newTestEnv(t)
	e.startServers([]netip.AddrPort{tcpA, tcpB}, nil)
	t.Cleanup(func() { Cleanup(e.pinDir) })

	d1, err := Load(e.config())
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	programServices(t, d1.Maps)
	must(t, d1.Maps.UpsertAffinityMatch(svcTCP, beTCPA))
	cidrs := []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16"), netip.MustParsePrefix("fd6b:7072:96::/112")}
	must(t, d1.Maps.SetServiceCIDRs(cidrs))
	linksBefore := pinnedLinks(t, e.pinDir)

	// The links sit on the test cgroup and nowhere else.
	cgID, err := cgroupID(e.cgroup)
	must(t, err)
	for _, h := range hooks {
		l, err := link.LoadPinnedLink(filepath.Join(e.pinDir, linksDir, h.name), nil)
		must(t, err)
		if !linkTargets(l, cgID, h.attach) {
			t.Errorf("link %s is not attached to %s as %s", h.name, e.cgroup, h.attach)
		}
		l.Close()
	}
	names, err := Attached(e.pinDir)
	must(t, err)
	wantNames := []string{"bind4", "bind6", "connect4", "connect6", "getpeername4", "getpeername6", "recvmsg4", "recvmsg6", "sendmsg4", "sendmsg6", "sock_release"}
	if !slices.Equal(names, wantNames) {
		t.Fatalf("Attached = %v, want %v", names, wantNames)
	}

	svcs1, err := d1.Maps.Services()
	must(t, err)
	bes1, err := d1.Maps.Backends()
	must(t, err)
	rns1, err := d1.Maps.RevNats()
	must(t, err)
	ams1, err := d1.Maps.AffinityMatches()
	must(t, err)
	must(t, d1.Close())

	// Stopped kpr: pins keep translating.
	ex, err := e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 80))
	must(t, err)
	if ex.peer != netip.AddrPortFrom(vip4, 80) {
		t.Fatalf("after Close: peer %s, want the VIP", ex.peer)
	}

	// Restart: same maps, same links, new programs.
	d2, err := Load(e.config())
	if err != nil {
		t.Fatalf("second Load: %v", err)
	}
	defer d2.Close()
	svcs2, err := d2.Maps.Services()
	must(t, err)
	bes2, err := d2.Maps.Backends()
	must(t, err)
	rns2, err := d2.Maps.RevNats()
	must(t, err)
	ams2, err := d2.Maps.AffinityMatches()
	must(t, err)
	if got, err := d2.Maps.ServiceCIDRs(); err != nil || !slices.Equal(got, cidrs) {
		t.Fatalf("service CIDRs after restart: %v %v, want %v", got, err, cidrs)
	}
	if !reflect.DeepEqual(svcs1, svcs2) || !maps.Equal(bes1, bes2) || !maps.Equal(rns1, rns2) || !maps.Equal(ams1, ams2) || len(ams2) != 1 {
		t.Fatalf("map contents changed across restart:\n%v\n%v\n%v\n%v\n%v\n%v", svcs1, svcs2, bes1, bes2, ams1, ams2)
	}
	linksAfter := pinnedLinks(t, e.pinDir)
	for name, before := range linksBefore {
		after := linksAfter[name]
		if after[0] != before[0] {
			t.Errorf("%s: link %d replaced by %d, want it updated in place", name, before[0], after[0])
		}
		if after[1] == before[1] {
			t.Errorf("%s: link still runs program %d, want the newly loaded one", name, before[1])
		}
	}
	ex, err = e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 80))
	must(t, err)
	if ex.peer != netip.AddrPortFrom(vip4, 80) {
		t.Fatalf("after restart: peer %s, want the VIP", ex.peer)
	}
	must(t, d2.Close())

	// OpenMaps sees what the datapath wrote.
	m, err := OpenMaps(e.pinDir)
	must(t, err)
	svcs3, err := m.Services()
	must(t, err)
	m.Close()
	if !reflect.DeepEqual(svcs1, svcs3) {
		t.Fatalf("OpenMaps: services %v, want %v", svcs3, svcs1)
	}

	must(t, Cleanup(e.pinDir))
	if _, err := os.Stat(e.pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pin dir still there after Cleanup: %v", err)
	}
	names, err = Attached(e.pinDir)
	must(t, err)
	if len(names) != 0 {
		t.Fatalf("Attached after Cleanup = %v", names)
	}
	_, err = e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 80))
	wantErrno(t, "connect after Cleanup", err, unix.ENETUNREACH)
	must(t, Cleanup(e.pinDir)) // idempotent

	_, err = OpenMaps(e.pinDir)
	if err == nil || !strings.Contains(err.Error(), "no kpr maps are pinned") {
		t.Fatalf("OpenMaps after Cleanup: %v", err)
	}
}

func TestLoadRejectsIncompatiblePinnedMap(t *testing.T) {
	e := newTestEnv(t)
	d := e.load()
	must(t, d.Close())

	cfg := e.config()
	cfg.ServiceMapSize *= 2
	_, err := Load(cfg)
	if err == nil {
		t.Fatal("Load with a different ServiceMapSize succeeded")
	}
	for _, want := range []string{"kpr_svc_v1", "ServiceMapSize"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	cfg = e.config()
	cfg.AffinityMatchMapSize *= 2
	_, err = Load(cfg)
	if err == nil {
		t.Fatal("Load with a different AffinityMatchMapSize succeeded")
	}
	for _, want := range []string{"kpr_affinity_match_v1", "AffinityMatchMapSize", "has 256 entries"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}

	// A pinned map of another layout: replace the affinity map by one with
	// a different value size.
	cfg = e.config()
	p := filepath.Join(e.pinDir, sockMapKprAffinityV1)
	must(t, os.Remove(p))
	odd, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.LRUHash, KeySize: 16, ValueSize: 4, MaxEntries: uint32(cfg.AffinityMapSize)})
	must(t, err)
	must(t, odd.Pin(p))
	odd.Close()
	_, err = Load(cfg)
	if err == nil || !strings.Contains(err.Error(), "kpr_affinity_v1") || !strings.Contains(err.Error(), "AffinityMapSize") {
		t.Fatalf("Load with an incompatible kpr_affinity_v1: %v", err)
	}
	_, err = OpenMaps(e.pinDir)
	if err == nil || !strings.Contains(err.Error(), "kpr_affinity_v1") {
		t.Fatalf("OpenMaps with an incompatible kpr_affinity_v1: %v", err)
	}

	// The Service CIDR trie has no size setting; a pinned map of another type is still named.
	must(t, Cleanup(e.pinDir))
	e.load().Close()
	p = filepath.Join(e.pinDir, sockMapKprSvcCidrsV1)
	must(t, os.Remove(p))
	odd, err = ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 20, ValueSize: 1, MaxEntries: MaxServiceCIDRs})
	must(t, err)
	must(t, odd.Pin(p))
	odd.Close()
	_, err = Load(cfg)
	if err == nil || !strings.Contains(err.Error(), "kpr_svc_cidrs_v1") || !strings.Contains(err.Error(), "kpr cleanup") {
		t.Fatalf("Load with an incompatible kpr_svc_cidrs_v1: %v", err)
	}
}

func TestLoadChecksFilesystems(t *testing.T) {
	requireRoot(t)
	bpffs := mountBPFFS(t)
	cg := makeCgroup(t)

	_, err := Load(Config{PinDir: filepath.Join(t.TempDir(), "kpr"), CgroupPath: cg})
	if err == nil || !strings.Contains(err.Error(), "PinDir") || !strings.Contains(err.Error(), "not on a bpf filesystem") {
		t.Fatalf("PinDir on tmpfs: %v", err)
	}
	_, err = Load(Config{PinDir: filepath.Join(bpffs, "kpr"), CgroupPath: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "CgroupPath") || !strings.Contains(err.Error(), "not a cgroup v2") {
		t.Fatalf("CgroupPath not on cgroup2: %v", err)
	}
	_, err = Load(Config{PinDir: filepath.Join(bpffs, "kpr"), CgroupPath: cg, RevNatMapSize: -1})
	if err == nil || !strings.Contains(err.Error(), "RevNatMapSize") {
		t.Fatalf("negative size: %v", err)
	}
	if err := Cleanup(t.TempDir()); err == nil {
		t.Fatal("Cleanup on a directory outside bpffs succeeded")
	}
}

func TestOpenMapsNothingPinned(t *testing.T) {
	requireRoot(t)
	_, err := OpenMaps(mountBPFFS(t))
	if err == nil || !strings.Contains(err.Error(), "no kpr maps are pinned") {
		t.Fatalf("OpenMaps on an empty bpffs: %v", err)
	}
}

func TestProbe(t *testing.T) {
	requireRoot(t)
	if err := Probe(); err != nil {
		t.Fatalf("Probe: %v", err)
	}
}

func TestLoadMovesToNewCgroup(t *testing.T) {
	e := newTestEnv(t)
	e.startServers([]netip.AddrPort{tcpA, tcpB}, nil)
	d := e.load()
	programServices(t, d.Maps)
	must(t, d.Close())
	before := pinnedLinks(t, e.pinDir)

	// kpr restarted with another CgroupPath: the test process stays in the
	// old cgroup, which must lose the hooks.
	other := makeCgroup(t)
	cfg := e.config()
	cfg.CgroupPath = other
	d2, err := Load(cfg)
	if err != nil {
		t.Fatalf("Load on another cgroup: %v", err)
	}
	defer d2.Close()
	otherID, err := cgroupID(other)
	must(t, err)
	for _, h := range hooks {
		l, err := link.LoadPinnedLink(filepath.Join(e.pinDir, linksDir, h.name), nil)
		must(t, err)
		if !linkTargets(l, otherID, h.attach) {
			t.Errorf("link %s not moved to %s", h.name, other)
		}
		l.Close()
	}
	after := pinnedLinks(t, e.pinDir)
	for name := range before {
		if before[name][0] == after[name][0] {
			t.Errorf("%s: still link %d", name, before[name][0])
		}
	}
	_, err = e.dialTCP(unix.AF_INET, netip.AddrPortFrom(vip4, 80))
	wantErrno(t, "connect from the old cgroup", err, unix.ENETUNREACH)
}
