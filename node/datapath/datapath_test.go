package datapath

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	v1 "k8s.io/api/core/v1"

	"github.com/kpr-dev/kpr/bpf"
	"github.com/kpr-dev/kpr/node/lbstate"
)

func fe(vip string, port uint16, proto v1.Protocol, backends ...string) lbstate.Frontend {
	f := lbstate.Frontend{FrontendKey: lbstate.FrontendKey{Addr: netip.MustParseAddr(vip), Port: port, Protocol: proto}}
	for _, b := range backends {
		f.Backends = append(f.Backends, netip.MustParseAddrPort(b))
	}
	return f
}

// programmed renders what the LBMap holds as "frontend -> sorted backends" lines, as a
// datapath reader would resolve them.
func programmed(t *testing.T, m LBMap) map[string][]string {
	t.Helper()
	svcs, err := m.Services()
	if err != nil {
		t.Fatal(err)
	}
	bes, err := m.Backends()
	if err != nil {
		t.Fatal(err)
	}
	revs, err := m.RevNats()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	for k, s := range svcs {
		var bs []string
		for _, id := range s.Backends {
			b, ok := bes[id]
			if !ok {
				t.Fatalf("%s names missing backend %d", keyString(k), id)
			}
			bs = append(bs, netip.AddrPortFrom(b.Addr, b.Port).String()+"/"+ProtoName(b.Proto))
		}
		slices.Sort(bs)
		if s.Flags&bpf.FlagUnreachable != 0 {
			bs = append(bs, "UNREACHABLE")
		}
		if !IsWildcard(k) {
			r, ok := revs[s.ID]
			if !ok || r.Addr != k.Addr || r.Port != k.Port {
				t.Fatalf("%s: reverse NAT %d is %+v (present %v)", keyString(k), s.ID, r, ok)
			}
		}
		out[keyString(k)] = bs
	}
	return out
}

func mustSync(t *testing.T, r *Reconciler, touched []string) Stats {
	t.Helper()
	st, err := r.Sync(touched)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestReconcilerProgramsAndRemoves(t *testing.T) {
	m := NewFake()
	r, err := NewReconciler(m)
	if err != nil {
		t.Fatal(err)
	}
	r.Set("default/web", []lbstate.Frontend{
		fe("10.96.0.10", 80, v1.ProtocolTCP, "10.244.1.2:8080", "10.244.1.3:8080"),
		fe("10.96.0.10", 53, v1.ProtocolUDP),
	})
	r.Set("default/dns", []lbstate.Frontend{fe("10.96.0.20", 53, v1.ProtocolUDP, "10.244.1.2:53")})
	mustSync(t, r, nil)
	got := programmed(t, m)
	want := map[string][]string{
		"10.96.0.10:80/tcp":     {"10.244.1.2:8080/tcp", "10.244.1.3:8080/tcp"},
		"10.96.0.10:53/udp":     nil,
		"10.96.0.10 (any port)": nil,
		"10.96.0.20:53/udp":     {"10.244.1.2:53/udp"},
		"10.96.0.20 (any port)": nil,
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("programmed:\n%v\nwant:\n%v", got, want)
	}

	// Removing one backend touches only that frontend and trims its slot.
	r.Set("default/web", []lbstate.Frontend{
		fe("10.96.0.10", 80, v1.ProtocolTCP, "10.244.1.3:8080"),
		fe("10.96.0.10", 53, v1.ProtocolUDP),
	})
	st := mustSync(t, r, []string{"default/web"})
	if st.Upserted != 1 || st.Deleted != 0 {
		t.Fatalf("stats %+v, want exactly one frontend rewritten", st)
	}
	if n := m.Slots(); n != 2 {
		t.Fatalf("%d backend slots left, want 2", n)
	}
	if bes, _ := m.Backends(); len(bes) != 2 {
		t.Fatalf("backends %v: the unreferenced one was not collected", bes)
	}

	// Deleting a Service removes its frontends, wildcard and reverse NAT.
	r.Set("default/web", nil)
	mustSync(t, r, []string{"default/web"})
	got = programmed(t, m)
	if len(got) != 2 || got["10.96.0.20:53/udp"] == nil {
		t.Fatalf("after delete: %v", got)
	}
	if revs, _ := m.RevNats(); len(revs) != 1 {
		t.Fatalf("reverse NAT left: %v", revs)
	}
	if len(m.Violations) > 0 {
		t.Fatalf("a reader could have seen a half-programmed frontend: %v", m.Violations)
	}
}

func TestUnreachableFlag(t *testing.T) {
	m := NewFake()
	r, _ := NewReconciler(m)
	f := fe("10.96.0.30", 80, v1.ProtocolTCP)
	f.NoBackends = lbstate.Unreachable
	r.Set("default/local", []lbstate.Frontend{f})
	mustSync(t, r, nil)
	if got := programmed(t, m)["10.96.0.30:80/tcp"]; !slices.Equal(got, []string{"UNREACHABLE"}) {
		t.Fatalf("got %v", got)
	}
}

// A restarted agent restores IDs from the maps and rewrites nothing that did not change.
func TestRestartRewritesNothing(t *testing.T) {
	m := NewFake()
	r, _ := NewReconciler(m)
	state := []lbstate.Frontend{
		fe("10.96.0.10", 80, v1.ProtocolTCP, "10.244.1.2:8080", "10.244.1.3:8080"),
		fe("fd6b:7072:96::a", 80, v1.ProtocolTCP, "[fd6b:7072:244:1::2]:8080"),
	}
	r.Set("default/web", state)
	mustSync(t, r, nil)
	before, _ := m.Services()
	writes := m.Writes

	r2, err := NewReconciler(m)
	if err != nil {
		t.Fatal(err)
	}
	r2.Set("default/web", state)
	st := mustSync(t, r2, nil)
	if m.Writes != writes || st.Upserted != 0 || st.Deleted != 0 {
		t.Fatalf("restart wrote %d times (stats %+v)", m.Writes-writes, st)
	}
	after, _ := m.Services()
	if fmt.Sprint(before) != fmt.Sprint(after) {
		t.Fatalf("IDs changed across restart:\n%v\n%v", before, after)
	}
	// A change after the restart reuses the restored backend IDs.
	r2.Set("default/web", state[:1])
	mustSync(t, r2, []string{"default/web"})
	after2, _ := m.Services()
	k := Key(state[0].FrontendKey)
	if !slices.Equal(before[k].Backends, after2[k].Backends) || before[k].ID != after2[k].ID {
		t.Fatalf("IDs of an unchanged frontend moved: %v -> %v", before[k], after2[k])
	}
}

// randomState builds n Services with random backends from a small pool, so backends are
// shared, added and removed between rounds.
func randomState(rng *rand.Rand, n int) map[string][]lbstate.Frontend {
	out := map[string][]lbstate.Frontend{}
	for i := range n {
		if rng.IntN(4) == 0 {
			continue
		}
		var bs []string
		for j := range 6 {
			if rng.IntN(2) == 0 {
				bs = append(bs, fmt.Sprintf("10.244.1.%d:8080", j+2))
			}
		}
		out[fmt.Sprintf("ns/s%d", i)] = []lbstate.Frontend{fe(fmt.Sprintf("10.96.0.%d", i+1), 80, v1.ProtocolTCP, bs...)}
	}
	return out
}

// Every write order the reconciler uses keeps each frontend complete for a concurrent reader,
// through random sequences of changes; the result always equals a from-scratch programming.
func TestMakeBeforeBreak(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	m := NewFake()
	r, _ := NewReconciler(m)
	for round := range 50 {
		state := randomState(rng, 8)
		var touched []string
		for i := range 8 {
			name := fmt.Sprintf("ns/s%d", i)
			r.Set(name, state[name])
			touched = append(touched, name)
		}
		mustSync(t, r, touched)
		fresh := NewFake()
		rf, _ := NewReconciler(fresh)
		for n, fes := range state {
			rf.Set(n, fes)
		}
		mustSync(t, rf, nil)
		if a, b := fmt.Sprint(programmed(t, m)), fmt.Sprint(programmed(t, fresh)); a != b {
			t.Fatalf("round %d: incremental state\n%s\ndiffers from fresh\n%s", round, a, b)
		}
	}
	if len(m.Violations) > 0 {
		t.Fatalf("%d violations, first: %s", len(m.Violations), m.Violations[0])
	}
}

// A write that fails at any point leaves no frontend half-programmed, and the next sync (full,
// because of the failure) converges to the desired state.
func TestFailedWriteIsRetried(t *testing.T) {
	base := map[string][]lbstate.Frontend{
		"ns/a": {fe("10.96.0.1", 80, v1.ProtocolTCP, "10.244.1.2:80", "10.244.1.3:80")},
		"ns/b": {fe("10.96.0.2", 80, v1.ProtocolTCP, "10.244.1.3:80")},
	}
	next := map[string][]lbstate.Frontend{
		"ns/a": {fe("10.96.0.1", 80, v1.ProtocolTCP, "10.244.1.4:80")},
		"ns/c": {fe("10.96.0.3", 81, v1.ProtocolUDP, "10.244.1.2:81", "10.244.1.5:81")},
	}
	failures := 0
	for failAt := 1; failAt < 40; failAt++ {
		fake := NewFake()
		faulty := &Faulty{LBMap: fake}
		r, _ := NewReconciler(faulty)
		for n, f := range base {
			r.Set(n, f)
		}
		mustSync(t, r, nil)
		faulty.writes = 0
		faulty.Fail = func(op string, n int) error {
			if n == failAt {
				return errors.New("injected failure in " + op)
			}
			return nil
		}
		for _, n := range []string{"ns/a", "ns/b", "ns/c"} {
			r.Set(n, next[n])
		}
		_, err := r.Sync([]string{"ns/a", "ns/b", "ns/c"})
		if len(fake.Violations) > 0 {
			t.Fatalf("fail at write %d: %v", failAt, fake.Violations)
		}
		if err == nil {
			continue // the change needed fewer writes than failAt
		}
		failures++
		faulty.Fail = nil
		if _, err := r.Sync([]string{}); err != nil {
			t.Fatalf("fail at write %d: retry: %v", failAt, err)
		}
		want := NewFake()
		rw, _ := NewReconciler(want)
		for n, f := range next {
			rw.Set(n, f)
		}
		mustSync(t, rw, nil)
		if a, b := fmt.Sprint(programmed(t, fake)), fmt.Sprint(programmed(t, want)); a != b {
			t.Fatalf("fail at write %d: after retry\n%s\nwant\n%s", failAt, a, b)
		}
		if bes, _ := fake.Backends(); len(bes) != 3 {
			t.Fatalf("fail at write %d: backends leaked or lost: %v", failAt, bes)
		}
	}
	if failures < 10 {
		t.Fatalf("only %d injected failures hit a write; the test exercises too little", failures)
	}
}
