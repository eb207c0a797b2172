package bpf

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// sessionAffinity ClientIP from outside: a client's new flows to a frontend with an affinity
// timeout go to the backend its last flow went to, while that backend still serves the
// frontend and the timeout has not passed since; other clients are spread as usual.
func TestNodePortSessionAffinity(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	e.programServices()
	m := e.d.Maps
	const svc = 81
	key := ServiceKey{Addr: npNode4, Port: 30090, Proto: ProtoTCP, Scope: ScopeExternal}
	all := []uint32{npBeA, npBeB, npBeC}
	addrOf := map[uint32]netip.AddrPort{npBeA: netip.AddrPortFrom(npPodA, 8080), npBeB: netip.AddrPortFrom(npPodB, 8080), npBeC: netip.AddrPortFrom(npPodC, 8080)}
	idOf := map[netip.AddrPort]uint32{}
	for id, ap := range addrOf {
		idOf[ap] = id
	}
	setTimeout := func(sec uint32, bes []uint32, prev int) {
		for _, id := range all {
			must(t, m.DeleteAffinityMatch(svc, id))
		}
		for _, id := range bes {
			must(t, m.UpsertAffinityMatch(svc, id))
		}
		must(t, m.UpsertService(key, Service{ID: svc, AffinityTimeoutSec: sec, Backends: bes}, prev))
	}
	setTimeout(10800, all, 0)
	fe := netip.AddrPortFrom(key.Addr, key.Port)
	flow := func(client netip.AddrPort) uint32 {
		t.Helper()
		in := buildPacket(pktSpec{src: client, dst: fe, proto: ProtoTCP, tcpFlags: tcpSYN})
		ret, out := e.nodeport(in)
		p := translated(t, in, out, ret, addrOf[npBeA], addrOf[npBeB], addrOf[npBeC])
		return idOf[p.dst]
	}
	c1 := npClient4
	first := flow(netip.AddrPortFrom(c1, 50000))
	for port := uint16(50001); port < 50021; port++ {
		if got := flow(netip.AddrPortFrom(c1, port)); got != first {
			t.Fatalf("flow from port %d went to backend %d, want %d like the client's first", port, got, first)
		}
	}
	seen := map[uint32]bool{}
	for i := range 20 {
		seen[flow(netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(120 + i)}), 50000))] = true
	}
	if len(seen) < 2 {
		t.Errorf("20 other clients all went to %v: affinity must be per client", seen)
	}

	// The remembered backend leaves the frontend: the client moves, and stays where it went.
	var rest []uint32
	for _, id := range all {
		if id != first {
			rest = append(rest, id)
		}
	}
	setTimeout(10800, rest, 3)
	moved := flow(netip.AddrPortFrom(c1, 50100))
	if moved == first {
		t.Fatalf("after backend %d left, the client still went to it", first)
	}
	for port := uint16(50101); port < 50111; port++ {
		if got := flow(netip.AddrPortFrom(c1, port)); got != moved {
			t.Fatalf("after the move: backend %d, want %d", got, moved)
		}
	}

	// The timeout counts from the client's last new flow.
	setTimeout(10, all, 2)
	var ts unix.Timespec
	must(t, unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts))
	remember := func(id uint32, ago int64) {
		k := lbLbAffinityKey{Client: c1.As16(), SvcId: svc}
		v := lbAffinityValue{BackendId: id, LastUsedSec: uint32(ts.Sec - ago)}
		must(t, e.n.Maps.affinity.Update(&k, &v, ebpf.UpdateAny))
	}
	remember(npBeC, 5)
	if got := flow(netip.AddrPortFrom(c1, 50200)); got != npBeC {
		t.Errorf("within the timeout: backend %d, want the remembered %d", got, npBeC)
	}
	others := 0
	for i := range 10 {
		remember(npBeC, 100)
		if flow(netip.AddrPortFrom(c1, uint16(50300+i))) != npBeC {
			others++
		}
	}
	if others == 0 {
		t.Error("past the timeout every flow still went to the remembered backend")
	}
}
