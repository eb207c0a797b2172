package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net"
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

// North-south test addressing (docs/ARCHITECTURE.md, "Test addressing"): the node is .11 on
// the test LAN, the client .100; the backends are pods behind the node's pod0 device.
var (
	npNode4   = netip.MustParseAddr("198.18.0.11")
	npNode6   = netip.MustParseAddr("fd6b:7072::11")
	npClient4 = netip.MustParseAddr("198.18.0.100")
	npClient6 = netip.MustParseAddr("fd6b:7072::100")
	npLBVIP   = netip.MustParseAddr("198.18.1.1") // a LoadBalancer IP routed to the node
	npPodA    = netip.MustParseAddr("10.244.1.2")
	npPodB    = netip.MustParseAddr("10.244.1.3")
	npPodC    = netip.MustParseAddr("10.244.1.4")
	npPodNN   = netip.MustParseAddr("10.244.1.9") // no neighbour entry
	npPod6    = netip.MustParseAddr("fd6b:7072:244:1::2")
	npFar     = netip.MustParseAddr("203.0.113.5") // no route

	podMACs = map[netip.Addr]net.HardwareAddr{
		npPodA: {0x02, 0, 0, 0, 1, 2},
		npPodB: {0x02, 0, 0, 0, 1, 3},
		npPodC: {0x02, 0, 0, 0, 1, 4},
		npPod6: {0x02, 0, 0, 0, 1, 2},
	}
	ext0MAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x0b}
	pod0MAC = net.HardwareAddr{0x02, 0, 0, 0, 1, 1}
)

// Backend, service IDs and frontends of the north-south tests.
const (
	npBeA, npBeB, npBeC, npBeNN, npBeFar, npBe6, npBeUDP, npBeUDP6 = 101, 102, 103, 104, 105, 106, 107, 108

	npSvcTCP, npSvcUDP, npSvcTCP6, npSvcUDP6, npSvcEmpty, npSvcLB, npSvcNN, npSvcFar, npSvcMaglev = 11, 12, 13, 14, 15, 16, 17, 18, 19
)

var (
	npKeyTCP    = ServiceKey{Addr: npNode4, Port: 30080, Proto: ProtoTCP, Scope: ScopeExternal}
	npKeyUDP    = ServiceKey{Addr: npNode4, Port: 30053, Proto: ProtoUDP, Scope: ScopeExternal}
	npKeyTCP6   = ServiceKey{Addr: npNode6, Port: 30080, Proto: ProtoTCP, Scope: ScopeExternal}
	npKeyUDP6   = ServiceKey{Addr: npNode6, Port: 30053, Proto: ProtoUDP, Scope: ScopeExternal}
	npKeyEmpty  = ServiceKey{Addr: npNode4, Port: 30099, Proto: ProtoTCP, Scope: ScopeExternal}
	npKeyLB     = ServiceKey{Addr: npLBVIP, Port: 80, Proto: ProtoTCP, Scope: ScopeExternal}
	npKeyLBWC   = ServiceKey{Addr: npLBVIP, Scope: ScopeExternal}
	npKeyNN     = ServiceKey{Addr: npNode4, Port: 30090, Proto: ProtoTCP, Scope: ScopeExternal}
	npKeyFar    = ServiceKey{Addr: npNode4, Port: 30091, Proto: ProtoTCP, Scope: ScopeExternal}
	npKeyMaglev = ServiceKey{Addr: npNode4, Port: 30081, Proto: ProtoTCP, Scope: ScopeExternal}
	// A socket-scope frontend at a node port: the tc programs must not see it.
	npKeySock = ServiceKey{Addr: npNode4, Port: 30100, Proto: ProtoTCP, Scope: ScopeSocket}
)

// npEnv is a network namespace set up as a node (below), a bpffs with both datapaths
// loaded, and a cgroup for the socket programs that nothing runs in.
//
//	client 198.18.0.100 ... ext0 (198.18.0.11, fd6b:7072::11)  [node]  pod0 (10.244.1.1) ... pods 10.244.1.2-4
//
// The neighbours are permanent entries, so bpf_fib_lookup resolves them and BPF_PROG_RUN of
// the tc programs shows the whole rewrite, MAC addresses included.
type npEnv struct {
	*testEnv
	d          *Datapath
	n          *NodePort
	ext0, pod0 int
	// cfg and np are what n was loaded with.
	cfg Config
	np  NodePortConfig
}

func newNodePortEnv(t *testing.T, cfg Config, np NodePortConfig) *npEnv {
	t.Helper()
	requireRoot(t)
	e := &npEnv{testEnv: &testEnv{t: t}}
	e.bpffs = mountBPFFS(t)
	e.pinDir = filepath.Join(e.bpffs, "kpr")
	e.cgroup = makeCgroup(t)
	e.netns = makeNetns(t)
	e.setupNode()

	c := e.config()
	c.ConntrackMapSize, c.MaglevMapSize, c.MaglevTableSize = cfg.ConntrackMapSize, cfg.MaglevMapSize, cfg.MaglevTableSize
	if c.ConntrackMapSize == 0 {
		c.ConntrackMapSize = 4096
	}
	if c.MaglevMapSize == 0 {
		c.MaglevMapSize = 64
	}
	var err error
	e.d, err = Load(c)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	t.Cleanup(func() {
		e.d.Close()
		if err := Cleanup(e.pinDir); err != nil {
			t.Errorf("Cleanup: %v", err)
		}
	})
	e.cfg, e.np = c, np
	e.n, err = LoadNodePort(c, np)
	if err != nil {
		t.Fatalf("LoadNodePort: %v", err)
	}
	t.Cleanup(func() { e.n.Close() })
	return e
}

func (e *testEnv) setupNode() {
	e.t.Helper()
	must(e.t, e.do(func() error {
		for _, f := range []string{"/proc/sys/net/ipv4/conf/all/forwarding", "/proc/sys/net/ipv6/conf/all/forwarding"} {
			if err := os.WriteFile(f, []byte("1"), 0); err != nil {
				return err
			}
		}
		return nil
	}))
	e.ip("link", "set", "lo", "up")
	e.ip("link", "add", "ext0", "address", ext0MAC.String(), "type", "veth", "peer", "name", "ext0p")
	e.ip("link", "add", "pod0", "address", pod0MAC.String(), "type", "veth", "peer", "name", "pod0p")
	for _, dev := range []string{"ext0", "ext0p", "pod0", "pod0p"} {
		e.ip("link", "set", dev, "up")
	}
	e.ip("addr", "add", "198.18.0.11/24", "dev", "ext0")
	e.ip("-6", "addr", "add", "fd6b:7072::11/64", "dev", "ext0", "nodad")
	e.ip("addr", "add", "10.244.1.1/24", "dev", "pod0")
	e.ip("-6", "addr", "add", "fd6b:7072:244:1::1/64", "dev", "pod0", "nodad")
	for a, mac := range podMACs {
		e.ip("neigh", "add", a.String(), "lladdr", mac.String(), "dev", "pod0", "nud", "permanent")
	}
	e.ip("neigh", "add", npClient4.String(), "lladdr", clientMAC.String(), "dev", "ext0", "nud", "permanent")
	e.ip("neigh", "add", npClient6.String(), "lladdr", clientMAC.String(), "dev", "ext0", "nud", "permanent")
}

func (e *npEnv) ifindexes() {
	e.t.Helper()
	must(e.t, e.do(func() error {
		for name, p := range map[string]*int{"ext0": &e.ext0, "pod0": &e.pod0} {
			ifi, err := net.InterfaceByName(name)
			if err != nil {
				return err
			}
			*p = ifi.Index
		}
		return nil
	}))
}

// skbContext is the start of struct __sk_buff, up to the fields BPF_PROG_RUN takes.
type skbContext struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto uint32
	Priority, IngressIfindex, Ifindex                                           uint32
}

// run runs prog on pkt as if it arrived on ifindex, inside the node namespace.
func (e *npEnv) run(prog *ebpf.Program, ifindex int, pkt []byte) (uint32, []byte) {
	e.t.Helper()
	ret, out, err := e.tryRun(prog, ifindex, pkt)
	if err != nil {
		e.t.Fatalf("BPF_PROG_RUN: %v", err)
	}
	return ret, out
}

func (e *npEnv) tryRun(prog *ebpf.Program, ifindex int, pkt []byte) (uint32, []byte, error) {
	var ret uint32
	out := make([]byte, len(pkt)+256)
	err := e.do(func() error {
		opts := &ebpf.RunOptions{
			Data:    pkt,
			DataOut: out,
			Context: skbContext{IngressIfindex: uint32(ifindex), Ifindex: uint32(ifindex)},
		}
		var err error
		ret, err = prog.Run(opts)
		out = opts.DataOut
		return err
	})
	return ret, out, err
}

func (e *npEnv) nodeport(pkt []byte) (uint32, []byte) {
	e.t.Helper()
	return e.run(e.n.objs.TcNodeport, e.ext0, pkt)
}

func (e *npEnv) reply(pkt []byte) (uint32, []byte) {
	e.t.Helper()
	return e.run(e.n.objs.TcNodeportReply, e.pod0, pkt)
}

func (e *npEnv) programServices() {
	e.t.Helper()
	m := e.d.Maps
	backends := map[uint32]Backend{
		npBeA:    {npPodA, 8080, ProtoTCP},
		npBeB:    {npPodB, 8080, ProtoTCP},
		npBeC:    {npPodC, 8080, ProtoTCP},
		npBeNN:   {npPodNN, 8080, ProtoTCP},
		npBeFar:  {npFar, 8080, ProtoTCP},
		npBe6:    {npPod6, 8080, ProtoTCP},
		npBeUDP:  {npPodA, 5353, ProtoUDP},
		npBeUDP6: {npPod6, 5353, ProtoUDP},
	}
	for id, b := range backends {
		must(e.t, m.UpsertBackend(id, b))
	}
	services := []struct {
		k ServiceKey
		s Service
	}{
		{npKeyTCP, Service{ID: npSvcTCP, Backends: []uint32{npBeA, npBeB}}},
		{npKeyUDP, Service{ID: npSvcUDP, Backends: []uint32{npBeUDP}}},
		{npKeyTCP6, Service{ID: npSvcTCP6, Backends: []uint32{npBe6}}},
		{npKeyUDP6, Service{ID: npSvcUDP6, Backends: []uint32{npBeUDP6}}},
		{npKeyEmpty, Service{ID: npSvcEmpty, Flags: FlagUnreachable}},
		{npKeyLB, Service{ID: npSvcLB, Backends: []uint32{npBeC}}},
		{npKeyLBWC, Service{}},
		{npKeyNN, Service{ID: npSvcNN, Backends: []uint32{npBeNN}}},
		{npKeyFar, Service{ID: npSvcFar, Backends: []uint32{npBeFar}}},
		{npKeyMaglev, Service{ID: npSvcMaglev, Backends: []uint32{npBeA, npBeB, npBeC}}},
		{npKeySock, Service{ID: 99, Backends: []uint32{npBeA}}},
	}
	for _, s := range services {
		must(e.t, m.UpsertService(s.k, s.s, 0))
	}
}

func (e *npEnv) stats() NodePortStats {
	e.t.Helper()
	s, err := e.n.Maps.Stats()
	must(e.t, err)
	return s
}

func (e *npEnv) flows() map[netip.AddrPort]Flow {
	e.t.Helper()
	fs, err := e.n.Maps.Flows()
	must(e.t, err)
	out := map[netip.AddrPort]Flow{}
	for _, f := range fs {
		out[f.Client] = f
	}
	return out
}

var npConfig = NodePortConfig{SNATAddr4: npNode4, SNATAddr6: npNode6, HashSeed: 0x6b707221}

// translated checks a packet tc_nodeport forwarded to a backend and returns it parsed.
func translated(t *testing.T, in, out []byte, ret uint32, wantBackends ...netip.AddrPort) packet {
	t.Helper()
	if ret != tcActRedirect {
		t.Fatalf("verdict %d, want TC_ACT_REDIRECT", int32(ret))
	}
	if len(out) != len(in) {
		t.Fatalf("length %d, want %d", len(out), len(in))
	}
	pin, err := parsePacket(in)
	must(t, err)
	p := checkChecksums(t, out, pin.proto == ProtoUDP && binary.BigEndian.Uint16(pin.l4[6:]) == 0)
	if !slices.Contains(wantBackends, p.dst) {
		t.Fatalf("sent to %s, want one of %v", p.dst, wantBackends)
	}
	wantSrc := npNode4
	if p.src.Addr().Is6() {
		wantSrc = npNode6
	}
	if p.src.Addr() != wantSrc || p.src.Port() < DefaultSNATPorts.First {
		t.Errorf("source %s, want %s and a port in %s", p.src, wantSrc, DefaultSNATPorts)
	}
	if p.ttl != pin.ttl-1 {
		t.Errorf("TTL %d, want %d", p.ttl, pin.ttl-1)
	}
	if !bytes.Equal(p.dstMAC, podMACs[p.dst.Addr()]) || !bytes.Equal(p.srcMAC, pod0MAC) {
		t.Errorf("MACs %s -> %s, want %s -> %s", p.srcMAC, p.dstMAC, pod0MAC, podMACs[p.dst.Addr()])
	}
	if !bytes.Equal(p.payload, pin.payload) || p.tcpFlags != pin.tcpFlags {
		t.Errorf("payload or TCP flags changed: %q %#x, want %q %#x", p.payload, p.tcpFlags, pin.payload, pin.tcpFlags)
	}
	if pin.l3[0]>>4 == 4 && !bytes.Equal(p.l3[20:], pin.l3[20:]) {
		t.Errorf("IPv4 options changed: %x, want %x", p.l3[20:], pin.l3[20:])
	}
	return p
}

func untouched(t *testing.T, what string, in, out []byte, ret uint32) {
	t.Helper()
	if ret != tcActUnspec {
		t.Errorf("%s: verdict %d, want TC_ACT_UNSPEC (not mine)", what, int32(ret))
	}
	if !bytes.Equal(in, out) {
		t.Errorf("%s: packet changed:\n%x\n%x", what, in, out)
	}
}

func TestNodePortProgRun(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	e.programServices()
	tcpA, tcpB := netip.AddrPortFrom(npPodA, 8080), netip.AddrPortFrom(npPodB, 8080)
	client := netip.AddrPortFrom(npClient4, 40000)
	frontend := netip.AddrPortFrom(npNode4, 30080)

	var first packet
	t.Run("tcp syn to a node port goes to a backend from the node's SNAT address", func(t *testing.T) {
		in := buildPacket(pktSpec{src: client, dst: frontend, proto: ProtoTCP, tcpFlags: tcpSYN})
		ret, out := e.nodeport(in)
		first = translated(t, in, out, ret, tcpA, tcpB)
		f, ok := e.flows()[client]
		if !ok {
			t.Fatalf("no flow of %s: %v", client, e.flows())
		}
		wantBackend := uint32(npBeA)
		if first.dst == tcpB {
			wantBackend = npBeB
		}
		if f.Frontend != frontend || f.Backend != first.dst || f.SNAT != first.src || f.Proto != ProtoTCP ||
			f.SvcID != npSvcTCP || f.BackendID != wantBackend || f.Replied || f.Closing || f.NoReverse || f.Idle > 2e9 {
			t.Errorf("flow %+v", f)
		}
	})
	if first.dst == (netip.AddrPort{}) {
		t.FailNow()
	}

	t.Run("every packet of the flow goes the same way", func(t *testing.T) {
		for i, flags := range []uint8{tcpACK, tcpACK | tcpPSH, tcpSYN} {
			in := buildPacket(pktSpec{src: client, dst: frontend, proto: ProtoTCP, tcpFlags: flags, payload: []byte(fmt.Sprintf("data %d", i))})
			ret, out := e.nodeport(in)
			p := translated(t, in, out, ret, first.dst)
			if p.src != first.src {
				t.Errorf("packet %d from %s, the flow's first from %s", i, p.src, first.src)
			}
		}
	})

	t.Run("the backend's reply goes back from the frontend", func(t *testing.T) {
		in := buildPacket(pktSpec{src: first.dst, dst: first.src, proto: ProtoTCP, tcpFlags: tcpSYN | tcpACK,
			payload: []byte("hello client"), srcMAC: podMACs[first.dst.Addr()], dstMAC: pod0MAC})
		ret, out := e.reply(in)
		if ret != tcActRedirect {
			t.Fatalf("verdict %d, want TC_ACT_REDIRECT", int32(ret))
		}
		p := checkChecksums(t, out, false)
		if p.src != frontend || p.dst != client || p.ttl != 63 || string(p.payload) != "hello client" {
			t.Errorf("reply %s -> %s ttl %d %q, want %s -> %s ttl 63", p.src, p.dst, p.ttl, p.payload, frontend, client)
		}
		if !bytes.Equal(p.srcMAC, ext0MAC) || !bytes.Equal(p.dstMAC, clientMAC) {
			t.Errorf("MACs %s -> %s, want %s -> %s", p.srcMAC, p.dstMAC, ext0MAC, clientMAC)
		}
		if f := e.flows()[client]; !f.Replied || f.Closing {
			t.Errorf("flow after the reply: %+v", f)
		}
	})

	t.Run("replies nobody asked for pass untouched", func(t *testing.T) {
		for _, src := range []netip.AddrPort{first.dst, netip.AddrPortFrom(npPodC, 8080)} {
			dst := netip.AddrPortFrom(npNode4, first.src.Port()+1)
			if src != first.dst {
				dst = first.src
			}
			in := buildPacket(pktSpec{src: src, dst: dst, proto: ProtoTCP, tcpFlags: tcpACK})
			ret, out := e.reply(in)
			untouched(t, src.String()+" -> "+dst.String(), in, out, ret)
		}
	})

	t.Run("new flows spread over the backends, one SNAT port each", func(t *testing.T) {
		seen := map[netip.AddrPort]int{}
		ports := map[netip.AddrPort]bool{}
		for i := range 64 {
			c := netip.AddrPortFrom(npClient4, uint16(41000+i))
			in := buildPacket(pktSpec{src: c, dst: frontend, proto: ProtoTCP, tcpFlags: tcpSYN})
			ret, out := e.nodeport(in)
			p := translated(t, in, out, ret, tcpA, tcpB)
			seen[p.dst]++
			key := netip.AddrPortFrom(p.dst.Addr(), p.src.Port())
			if ports[key] {
				t.Errorf("SNAT port %d given twice towards %s", p.src.Port(), p.dst)
			}
			ports[key] = true
		}
		if seen[tcpA] == 0 || seen[tcpB] == 0 {
			t.Errorf("backends chosen: %v", seen)
		}
	})

	t.Run("ipv4 options are kept", func(t *testing.T) {
		in := buildPacket(pktSpec{src: netip.AddrPortFrom(npClient4, 42000), dst: frontend, proto: ProtoTCP, tcpFlags: tcpSYN,
			options: []byte{1, 1, 7, 7, 4, 0, 0, 0}, payload: []byte("x")}) // NOP NOP, record route (empty)
		ret, out := e.nodeport(in)
		translated(t, in, out, ret, tcpA, tcpB)
	})

	t.Run("a LoadBalancer IP is translated, its other ports dropped", func(t *testing.T) {
		c := netip.AddrPortFrom(npClient4, 42001)
		in := buildPacket(pktSpec{src: c, dst: netip.AddrPortFrom(npLBVIP, 80), proto: ProtoTCP, tcpFlags: tcpSYN})
		ret, out := e.nodeport(in)
		translated(t, in, out, ret, netip.AddrPortFrom(npPodC, 8080))

		before := e.stats()
		in = buildPacket(pktSpec{src: c, dst: netip.AddrPortFrom(npLBVIP, 81), proto: ProtoTCP, tcpFlags: tcpSYN})
		if ret, _ := e.nodeport(in); ret != tcActShot {
			t.Errorf("unserved port of a VIP: verdict %d, want TC_ACT_SHOT", int32(ret))
		}
		if after := e.stats(); after.DropNotServed != before.DropNotServed+1 {
			t.Errorf("DropNotServed %d -> %d", before.DropNotServed, after.DropNotServed)
		}
	})

	t.Run("udp", func(t *testing.T) {
		c := netip.AddrPortFrom(npClient4, 43000)
		fe := netip.AddrPortFrom(npNode4, 30053)
		in := buildPacket(pktSpec{src: c, dst: fe, proto: ProtoUDP, payload: []byte("query")})
		ret, out := e.nodeport(in)
		p := translated(t, in, out, ret, netip.AddrPortFrom(npPodA, 5353))
		if binary.BigEndian.Uint16(p.l4[6:]) == 0 {
			t.Errorf("UDP checksum became 0")
		}
		in = buildPacket(pktSpec{src: p.dst, dst: p.src, proto: ProtoUDP, payload: []byte("answer")})
		ret, out = e.reply(in)
		if ret != tcActRedirect {
			t.Fatalf("reply verdict %d", int32(ret))
		}
		if r := checkChecksums(t, out, false); r.src != fe || r.dst != c {
			t.Errorf("reply %s -> %s, want %s -> %s", r.src, r.dst, fe, c)
		}
	})

	t.Run("udp without checksum keeps none", func(t *testing.T) {
		c := netip.AddrPortFrom(npClient4, 43001)
		fe := netip.AddrPortFrom(npNode4, 30053)
		in := buildPacket(pktSpec{src: c, dst: fe, proto: ProtoUDP, payload: []byte("query"), noCsum: true})
		ret, out := e.nodeport(in)
		p := translated(t, in, out, ret, netip.AddrPortFrom(npPodA, 5353))
		if binary.BigEndian.Uint16(p.l4[6:]) != 0 {
			t.Errorf("UDP checksum %#04x, want 0 (none)", binary.BigEndian.Uint16(p.l4[6:]))
		}
		in = buildPacket(pktSpec{src: p.dst, dst: p.src, proto: ProtoUDP, payload: []byte("answer"), noCsum: true})
		ret, out = e.reply(in)
		if ret != tcActRedirect {
			t.Fatalf("reply verdict %d", int32(ret))
		}
		r := checkChecksums(t, out, true)
		if binary.BigEndian.Uint16(r.l4[6:]) != 0 || r.dst != c {
			t.Errorf("reply to %s with UDP checksum %#04x, want to %s with 0", r.dst, binary.BigEndian.Uint16(r.l4[6:]), c)
		}
	})

	t.Run("ethernet padding after a short datagram stays out of the checksum", func(t *testing.T) {
		in := buildPacket(pktSpec{src: netip.AddrPortFrom(npClient4, 43002), dst: netip.AddrPortFrom(npNode4, 30053), proto: ProtoUDP, payload: []byte("q")})
		in = append(in, make([]byte, 60-len(in))...)
		ret, out := e.nodeport(in)
		translated(t, in, out, ret, netip.AddrPortFrom(npPodA, 5353))
		if !bytes.Equal(out[len(out)-10:], make([]byte, 10)) {
			t.Errorf("padding changed: %x", out)
		}
	})

	for _, proto := range []Proto{ProtoTCP, ProtoUDP} {
		t.Run("ipv6 "+proto.String(), func(t *testing.T) {
			c := netip.AddrPortFrom(npClient6, 44000)
			fe := netip.AddrPortFrom(npNode6, 30080)
			be := netip.AddrPortFrom(npPod6, 8080)
			if proto == ProtoUDP {
				fe, be = netip.AddrPortFrom(npNode6, 30053), netip.AddrPortFrom(npPod6, 5353)
			}
			in := buildPacket(pktSpec{src: c, dst: fe, proto: proto, tcpFlags: tcpSYN, payload: []byte("six")})
			ret, out := e.nodeport(in)
			p := translated(t, in, out, ret, be)
			in = buildPacket(pktSpec{src: p.dst, dst: p.src, proto: proto, tcpFlags: tcpSYN | tcpACK, payload: []byte("xis")})
			ret, out = e.reply(in)
			if ret != tcActRedirect {
				t.Fatalf("reply verdict %d", int32(ret))
			}
			r := checkChecksums(t, out, false)
			if r.src != fe || r.dst != c || r.ttl != 63 || !bytes.Equal(r.dstMAC, clientMAC) {
				t.Errorf("reply %s -> %s ttl %d to %s, want %s -> %s ttl 63 to %s", r.src, r.dst, r.ttl, r.dstMAC, fe, c, clientMAC)
			}
		})
	}

	t.Run("a frontend whose endpoints are none usable here drops", func(t *testing.T) {
		before := e.stats()
		in := buildPacket(pktSpec{src: client, dst: netip.AddrPortFrom(npNode4, 30099), proto: ProtoTCP, tcpFlags: tcpSYN})
		if ret, _ := e.nodeport(in); ret != tcActShot {
			t.Errorf("verdict %d, want TC_ACT_SHOT", int32(ret))
		}
		if after := e.stats(); after.DropNoBackend != before.DropNoBackend+1 {
			t.Errorf("DropNoBackend %d -> %d", before.DropNoBackend, after.DropNoBackend)
		}
	})

	t.Run("what is no external frontend passes untouched", func(t *testing.T) {
		for _, s := range []pktSpec{
			{src: client, dst: netip.AddrPortFrom(npNode4, 22), proto: ProtoTCP, tcpFlags: tcpSYN},
			{src: client, dst: netip.AddrPortFrom(npNode4, 30080), proto: ProtoUDP},
			{src: client, dst: netip.AddrPortFrom(npNode4, 30100), proto: ProtoTCP, tcpFlags: tcpSYN}, // socket scope
			{src: netip.AddrPortFrom(npClient6, 1), dst: netip.AddrPortFrom(npNode6, 22), proto: ProtoTCP},
		} {
			in := buildPacket(s)
			ret, out := e.nodeport(in)
			untouched(t, fmt.Sprintf("%s %s", s.proto, s.dst), in, out, ret)
		}
		arp := append(append(append([]byte{}, nodeMAC...), clientMAC...), 0x08, 0x06)
		arp = append(arp, make([]byte, 28)...)
		ret, out := e.nodeport(arp)
		untouched(t, "ARP", arp, out, ret)
		ret, out = e.reply(arp)
		untouched(t, "ARP (reply program)", arp, out, ret)
	})

	t.Run("time to live", func(t *testing.T) {
		before := e.stats()
		// As a router: time exceeded, from the frontend, quoting the packet.
		for _, c := range []struct {
			src, dst  netip.AddrPort
			typ, code byte
		}{
			{netip.AddrPortFrom(npClient4, 45000), frontend, 11, 0},
			{netip.AddrPortFrom(npClient6, 45000), netip.AddrPortFrom(npNode6, 30080), 3, 0},
		} {
			in := buildPacket(pktSpec{src: c.src, dst: c.dst, proto: ProtoTCP, tcpFlags: tcpSYN, ttl: 1})
			ret, out := e.nodeport(in)
			if ret != tcActRedirect {
				t.Fatalf("TTL 1 %s: verdict %d, want TC_ACT_REDIRECT (time exceeded)", c.dst, int32(ret))
			}
			osrc, odst, typ, code, rest, isrc, idst := icmpErrorParts(t, out)
			if osrc != c.dst.Addr() || odst != c.src.Addr() || typ != c.typ || code != c.code || rest != 0 || isrc != c.src || idst != c.dst {
				t.Errorf("TTL 1 %s: %s -> %s type %d code %d rest %d quoting %s -> %s", c.dst, osrc, odst, typ, code, rest, isrc, idst)
			}
		}
		if after := e.stats(); after.TTLExceeded != before.TTLExceeded+2 || after.DropTTL != before.DropTTL {
			t.Errorf("TTLExceeded %d -> %d, DropTTL %d -> %d", before.TTLExceeded, after.TTLExceeded, before.DropTTL, after.DropTTL)
		}
		in := buildPacket(pktSpec{src: netip.AddrPortFrom(npClient4, 45001), dst: frontend, proto: ProtoTCP, tcpFlags: tcpSYN, ttl: 2})
		ret, out := e.nodeport(in)
		translated(t, in, out, ret, tcpA, tcpB)
	})

	t.Run("no neighbour: the kernel resolves it", func(t *testing.T) {
		in := buildPacket(pktSpec{src: netip.AddrPortFrom(npClient4, 46000), dst: netip.AddrPortFrom(npNode4, 30090), proto: ProtoTCP, tcpFlags: tcpSYN})
		ret, out := e.nodeport(in)
		if ret != tcActRedirect {
			t.Fatalf("verdict %d, want TC_ACT_REDIRECT (bpf_redirect_neigh)", int32(ret))
		}
		p := checkChecksums(t, out, false)
		if p.dst != netip.AddrPortFrom(npPodNN, 8080) || p.ttl != 63 || !bytes.Equal(p.dstMAC, nodeMAC) {
			t.Errorf("%s ttl %d mac %s: want %s:8080, ttl 63, MACs left to the kernel", p.dst, p.ttl, p.dstMAC, npPodNN)
		}
	})

	t.Run("no route: translated and left to the stack", func(t *testing.T) {
		before := e.stats()
		in := buildPacket(pktSpec{src: netip.AddrPortFrom(npClient4, 46001), dst: netip.AddrPortFrom(npNode4, 30091), proto: ProtoTCP, tcpFlags: tcpSYN})
		ret, out := e.nodeport(in)
		if ret != tcActOK {
			t.Fatalf("verdict %d, want TC_ACT_OK", int32(ret))
		}
		p := checkChecksums(t, out, false)
		if p.dst != netip.AddrPortFrom(npFar, 8080) || p.ttl != 64 {
			t.Errorf("%s ttl %d, want %s:8080 with the TTL untouched (the stack decrements it)", p.dst, p.ttl, npFar)
		}
		if after := e.stats(); after.PassFIB != before.PassFIB+1 {
			t.Errorf("PassFIB %d -> %d", before.PassFIB, after.PassFIB)
		}
	})

	t.Run("a flow whose backend is gone starts over", func(t *testing.T) {
		c := netip.AddrPortFrom(npClient4, 47000)
		k := ServiceKey{Addr: npNode4, Port: 30200, Proto: ProtoTCP, Scope: ScopeExternal}
		must(t, e.d.Maps.UpsertBackend(201, Backend{npPodA, 9090, ProtoTCP}))
		must(t, e.d.Maps.UpsertBackend(202, Backend{npPodB, 9090, ProtoTCP}))
		must(t, e.d.Maps.UpsertService(k, Service{ID: 30, Backends: []uint32{201}}, 0))
		in := buildPacket(pktSpec{src: c, dst: netip.AddrPortFrom(k.Addr, k.Port), proto: ProtoTCP, tcpFlags: tcpACK})
		ret, out := e.nodeport(in)
		old := translated(t, in, out, ret, netip.AddrPortFrom(npPodA, 9090))

		must(t, e.d.Maps.UpsertService(k, Service{ID: 30, Backends: []uint32{202}}, 1))
		must(t, e.d.Maps.DeleteBackend(201))
		ret, out = e.nodeport(in)
		translated(t, in, out, ret, netip.AddrPortFrom(npPodB, 9090))
		// The old reverse entry went with it.
		rin := buildPacket(pktSpec{src: old.dst, dst: old.src, proto: ProtoTCP, tcpFlags: tcpACK})
		ret, out = e.reply(rin)
		untouched(t, "reply of the old backend", rin, out, ret)
	})

	t.Run("a family without SNAT address drops", func(t *testing.T) {
		must(t, e.n.Maps.SetConfig(NodePortConfig{SNATAddr4: npNode4}))
		t.Cleanup(func() { must(t, e.n.Maps.SetConfig(npConfig)) })
		before := e.stats()
		in := buildPacket(pktSpec{src: netip.AddrPortFrom(npClient6, 48000), dst: netip.AddrPortFrom(npNode6, 30080), proto: ProtoTCP, tcpFlags: tcpSYN})
		if ret, _ := e.nodeport(in); ret != tcActShot {
			t.Errorf("verdict %d, want TC_ACT_SHOT", int32(ret))
		}
		if after := e.stats(); after.DropNoNodeAddr != before.DropNoNodeAddr+1 {
			t.Errorf("DropNoNodeAddr %d -> %d", before.DropNoNodeAddr, after.DropNoNodeAddr)
		}
	})

	t.Run("counters", func(t *testing.T) {
		s := e.stats()
		if s.NewFlows == 0 || s.Forwarded <= s.NewFlows || s.Replies == 0 || s.DropError != 0 || s.DropNoSNATPort != 0 {
			t.Errorf("stats %+v", s)
		}
	})
}

// Packets the programs must never translate: the stack, not kpr, decides about them. They
// pass byte for byte (or are dropped) and create no flow.
func TestNodePortMalformed(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	e.programServices()
	client := netip.AddrPortFrom(npClient4, 50000)
	frontend := netip.AddrPortFrom(npNode4, 30080)
	tcp := func() []byte {
		return buildPacket(pktSpec{src: client, dst: frontend, proto: ProtoTCP, tcpFlags: tcpSYN, payload: []byte("payload!")})
	}
	udp := func() []byte {
		return buildPacket(pktSpec{src: client, dst: netip.AddrPortFrom(npNode4, 30053), proto: ProtoUDP, payload: []byte("payload!")})
	}
	tcp6 := func() []byte {
		return buildPacket(pktSpec{src: netip.AddrPortFrom(npClient6, 50000), dst: netip.AddrPortFrom(npNode6, 30080), proto: ProtoTCP, tcpFlags: tcpSYN, payload: []byte("payload!")})
	}
	const ip = ethHdrLen
	set16 := func(b []byte, off int, v uint16) []byte { binary.BigEndian.PutUint16(b[off:], v); return b }
	cases := []struct {
		name string
		pkt  []byte
		frag bool
	}{
		{"ethernet header and one byte", tcp()[:ethHdrLen+1], false},
		{"truncated IPv4 header", tcp()[:ip+12], false},
		{"IPv4 header without L4", tcp()[:ip+ipv4Len], false},
		{"truncated TCP header", tcp()[:ip+ipv4Len+10], false},
		{"IHL 4", func() []byte { b := tcp(); b[ip] = 0x44; return b }(), false},
		{"IHL beyond the packet", func() []byte { b := tcp(); b[ip] = 0x4f; return b }(), false},
		{"version 6 in an IPv4 frame", func() []byte { b := tcp(); b[ip] = 0x65; return b }(), false},
		{"total length beyond the packet", set16(tcp(), ip+2, 200), false},
		{"total length below the headers", set16(tcp(), ip+2, ipv4Len+10), false},
		{"total length below the IHL", set16(tcp(), ip+2, 10), false},
		{"TCP data offset 4", func() []byte { b := tcp(); b[ip+ipv4Len+12] = 4 << 4; return b }(), false},
		{"TCP data offset beyond the segment", func() []byte { b := tcp(); b[ip+ipv4Len+12] = 15 << 4; return b }(), false},
		{"UDP length 4", set16(udp(), ip+ipv4Len+4, 4), false},
		{"UDP length beyond the packet", set16(udp(), ip+ipv4Len+4, 100), false},
		{"IPv4 first fragment", set16(tcp(), ip+6, 0x2000), true},
		{"IPv4 later fragment", set16(tcp(), ip+6, 0x0010), true},
		{"IPv4 last fragment", buildPacket(pktSpec{src: client, dst: frontend, proto: ProtoTCP, fragOff: 0x00b9}), true},
		{"truncated IPv6 header", tcp6()[:ip+30], false},
		{"IPv6 payload length beyond the packet", set16(tcp6(), ip+4, 500), false},
		{"IPv6 truncated TCP", tcp6()[:ip+ipv6Len+12], false},
		{"IPv6 fragment header", func() []byte { b := tcp6(); b[ip+6] = 44; return b }(), false},
		{"IPv6 hop-by-hop header", func() []byte { b := tcp6(); b[ip+6] = 0; return b }(), false},
		{"version 4 in an IPv6 frame", func() []byte { b := tcp6(); b[ip] = 0x40; return b }(), false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := e.stats()
			in := append([]byte(nil), c.pkt...)
			for _, prog := range []struct {
				name    string
				prog    *ebpf.Program
				ifindex int
			}{{"tc_nodeport", e.n.objs.TcNodeport, e.ext0}, {"tc_nodeport_reply", e.n.objs.TcNodeportReply, e.pod0}} {
				ret, out, err := e.tryRun(prog.prog, prog.ifindex, in)
				if errors.Is(err, unix.EINVAL) {
					t.Skipf("BPF_PROG_RUN refuses to build this skb: %v", err)
				}
				must(t, err)
				switch ret {
				case tcActUnspec, tcActOK:
					if !bytes.Equal(in, out) {
						t.Errorf("%s passed a changed packet:\n%x\n%x", prog.name, in, out)
					}
				case tcActShot:
				default:
					t.Errorf("%s: verdict %d, want pass or drop", prog.name, int32(ret))
				}
			}
			after := e.stats()
			if c.frag && after.PassFragment != before.PassFragment+2 {
				t.Errorf("PassFragment %d -> %d, want +2", before.PassFragment, after.PassFragment)
			}
			if after.NewFlows != before.NewFlows || after.Forwarded != before.Forwarded {
				t.Errorf("a flow was created: %+v", after)
			}
		})
	}
	if fs := e.flows(); len(fs) != 0 {
		t.Errorf("flows: %v", fs)
	}
	// And the well-formed versions are translated: the cases broke what they meant to.
	for _, b := range [][]byte{tcp(), udp(), tcp6()} {
		if ret, _ := e.nodeport(b); ret != tcActRedirect {
			t.Errorf("well-formed packet: verdict %d", int32(ret))
		}
	}
}

func TestNodePortMaglev(t *testing.T) {
	const size = 251
	e := newNodePortEnv(t, Config{MaglevTableSize: size}, npConfig)
	e.ifindexes()
	e.programServices()
	frontend := netip.AddrPortFrom(npNode4, 30081)
	ids := []uint32{npBeA, npBeB, npBeC}
	byID := map[uint32]netip.AddrPort{npBeA: netip.AddrPortFrom(npPodA, 8080), npBeB: netip.AddrPortFrom(npPodB, 8080), npBeC: netip.AddrPortFrom(npPodC, 8080)}

	if got := e.n.Maps.MaglevTableSize(); got != size {
		t.Fatalf("MaglevTableSize %d", got)
	}
	table := make([]uint32, size)
	for i := range table {
		table[i] = ids[(i*7+i/5)%3]
	}
	must(t, e.n.Maps.SetMaglevTable(npSvcMaglev, table))
	if got, err := e.n.Maps.MaglevTable(npSvcMaglev); err != nil || !slices.Equal(got, table) {
		t.Fatalf("MaglevTable = %v, %v", got, err)
	}
	if got, err := e.n.Maps.MaglevServices(); err != nil || !slices.Equal(got, []uint32{npSvcMaglev}) {
		t.Fatalf("MaglevServices = %v, %v", got, err)
	}

	chosen := map[netip.AddrPort]netip.AddrPort{}
	for i := range 100 {
		c := netip.AddrPortFrom(npClient4, uint16(20000+i*17))
		want := byID[table[flowHash(c, frontend, ProtoTCP, npConfig.HashSeed)%size]]
		in := buildPacket(pktSpec{src: c, dst: frontend, proto: ProtoTCP, tcpFlags: tcpSYN})
		ret, out := e.nodeport(in)
		p := translated(t, in, out, ret, want)
		chosen[c] = p.dst
	}
	if vs := slices.Collect(maps.Values(chosen)); len(slices.CompactFunc(slices.SortedFunc(slices.Values(vs), netip.AddrPort.Compare), func(a, b netip.AddrPort) bool { return a == b })) != 3 {
		t.Errorf("backends chosen: %v", vs)
	}

	// A new table replaces the old one whole; existing flows keep their backend.
	allC := slices.Repeat([]uint32{npBeC}, size)
	must(t, e.n.Maps.SetMaglevTable(npSvcMaglev, allC))
	for c, be := range chosen {
		in := buildPacket(pktSpec{src: c, dst: frontend, proto: ProtoTCP, tcpFlags: tcpACK})
		ret, out := e.nodeport(in)
		translated(t, in, out, ret, be)
	}
	for i := range 20 {
		c := netip.AddrPortFrom(npClient4, uint16(30000+i))
		in := buildPacket(pktSpec{src: c, dst: frontend, proto: ProtoTCP, tcpFlags: tcpSYN})
		ret, out := e.nodeport(in)
		translated(t, in, out, ret, byID[npBeC])
	}

	// A table naming a backend that is gone falls back to the slots.
	must(t, e.n.Maps.SetMaglevTable(npSvcMaglev, slices.Repeat([]uint32{4242}, size)))
	in := buildPacket(pktSpec{src: netip.AddrPortFrom(npClient4, 31000), dst: frontend, proto: ProtoTCP, tcpFlags: tcpSYN})
	ret, out := e.nodeport(in)
	translated(t, in, out, ret, byID[npBeA], byID[npBeB], byID[npBeC])

	must(t, e.n.Maps.DeleteMaglevTable(npSvcMaglev))
	must(t, e.n.Maps.DeleteMaglevTable(npSvcMaglev)) // idempotent
	if got, err := e.n.Maps.MaglevTable(npSvcMaglev); err != nil || got != nil {
		t.Fatalf("MaglevTable after delete = %v, %v", got, err)
	}

	for _, bad := range []struct {
		id    uint32
		table []uint32
	}{{0, table}, {npSvcMaglev, table[:size-1]}, {npSvcMaglev, make([]uint32, size)}} {
		if err := e.n.Maps.SetMaglevTable(bad.id, bad.table); err == nil {
			t.Errorf("SetMaglevTable(%d, %d entries) succeeded", bad.id, len(bad.table))
		}
	}
}

// agePair makes the flow of client look idle for d.
func (e *npEnv) ageFlow(client netip.AddrPort, proto Proto, frontend netip.AddrPort, idle uint32) {
	e.t.Helper()
	k := lbFlowKey{Saddr: client.Addr().As16(), Daddr: frontend.Addr().As16(), Sport: netPort(client.Port()), Dport: netPort(frontend.Port()), Proto: uint8(proto)}
	var v lbCtValue
	must(e.t, e.n.Maps.ct.Lookup(&k, &v))
	now, err := monotonicSec()
	must(e.t, err)
	v.LastSeen = now - idle
	must(e.t, e.n.Maps.ct.Update(&k, &v, ebpf.UpdateExist))
	rk := lbFlowKey{Saddr: v.BackendAddr, Daddr: v.SnatAddr, Sport: v.BackendPort, Dport: v.SnatPort, Proto: uint8(proto)}
	var rv lbSnatValue
	must(e.t, e.n.Maps.snat.Lookup(&rk, &rv))
	rv.LastSeen = now - idle
	must(e.t, e.n.Maps.snat.Update(&rk, &rv, ebpf.UpdateExist))
}

func TestNodePortSNATPorts(t *testing.T) {
	np := npConfig
	np.SNATPorts = PortRange{61000, 61001}
	e := newNodePortEnv(t, Config{}, np)
	e.ifindexes()
	e.programServices()
	udpFE := netip.AddrPortFrom(npNode4, 30053)
	udpBE := netip.AddrPortFrom(npPodA, 5353)
	c := func(i int) netip.AddrPort { return netip.AddrPortFrom(npClient4, uint16(52000+i)) }
	send := func(i int) (uint32, []byte, []byte) {
		in := buildPacket(pktSpec{src: c(i), dst: udpFE, proto: ProtoUDP, payload: []byte("q")})
		ret, out := e.nodeport(in)
		return ret, in, out
	}

	ports := map[uint16]int{}
	for i := range 2 {
		ret, in, out := send(i)
		ports[translated(t, in, out, ret, udpBE).src.Port()] = i
	}
	if len(ports) != 2 {
		t.Fatalf("ports %v, want 61000 and 61001", ports)
	}
	before := e.stats()
	if ret, _, _ := send(2); ret != tcActShot {
		t.Fatalf("third flow with two SNAT ports: verdict %d, want TC_ACT_SHOT", int32(ret))
	}
	if after := e.stats(); after.DropNoSNATPort != before.DropNoSNATPort+1 {
		t.Errorf("DropNoSNATPort %d -> %d", before.DropNoSNATPort, after.DropNoSNATPort)
	}

	// Flow 0 is idle for longer than the UDP timeout: flow 2 takes its port, and flow 0's
	// forward entry goes too (a packet of it would be a new flow).
	e.ageFlow(c(0), ProtoUDP, udpFE, uint32(DefaultUDPTimeout/1e9)+5)
	ret, in, out := send(2)
	if p := translated(t, in, out, ret, udpBE); ports[p.src.Port()] != 0 {
		t.Errorf("flow 2 got port %d, want flow 0's", p.src.Port())
	}
	fs := e.flows()
	if _, ok := fs[c(0)]; ok {
		t.Errorf("flow 0 still tracked: %+v", fs[c(0)])
	}
	if len(fs) != 2 {
		t.Errorf("flows %v", fs)
	}

	// TCP: after a RST the close timeout applies, an answered flow keeps its port for the
	// TCP timeout.
	tcpFE := netip.AddrPortFrom(npNode4, 30200)
	must(t, e.d.Maps.UpsertBackend(301, Backend{npPodC, 9090, ProtoTCP}))
	must(t, e.d.Maps.UpsertService(ServiceKey{Addr: npNode4, Port: 30200, Proto: ProtoTCP, Scope: ScopeExternal}, Service{ID: 31, Backends: []uint32{301}}, 0))
	tcpBE := netip.AddrPortFrom(npPodC, 9090)
	var snat [2]netip.AddrPort
	for i := range 2 {
		in := buildPacket(pktSpec{src: c(10 + i), dst: tcpFE, proto: ProtoTCP, tcpFlags: tcpSYN})
		ret, out := e.nodeport(in)
		snat[i] = translated(t, in, out, ret, tcpBE).src
		in = buildPacket(pktSpec{src: tcpBE, dst: snat[i], proto: ProtoTCP, tcpFlags: tcpSYN | tcpACK})
		if ret, _ := e.reply(in); ret != tcActRedirect {
			t.Fatalf("reply: verdict %d", int32(ret))
		}
	}
	in = buildPacket(pktSpec{src: c(10), dst: tcpFE, proto: ProtoTCP, tcpFlags: tcpRST})
	ret, out = e.nodeport(in)
	translated(t, in, out, ret, tcpBE)
	if f := e.flows()[c(10)]; !f.Closing || !f.Replied {
		t.Errorf("flow after RST: %+v", f)
	}
	idle := uint32(DefaultTCPCloseTimeout/1e9) + 5
	e.ageFlow(c(10), ProtoTCP, tcpFE, idle)
	e.ageFlow(c(11), ProtoTCP, tcpFE, idle)
	in = buildPacket(pktSpec{src: c(12), dst: tcpFE, proto: ProtoTCP, tcpFlags: tcpSYN})
	ret, out = e.nodeport(in)
	if p := translated(t, in, out, ret, tcpBE); p.src != snat[0] {
		t.Errorf("new flow got %s, want the closed flow's %s", p.src, snat[0])
	}
	if f, ok := e.flows()[c(11)]; !ok || f.NoReverse {
		t.Errorf("the established flow lost its port: %+v", f)
	}

	// A FIN from one end is a half close; from both ends the flow is closing. A new SYN on
	// the tuple starts a new connection on the same backend and port.
	in = buildPacket(pktSpec{src: c(12), dst: tcpFE, proto: ProtoTCP, tcpFlags: tcpFIN | tcpACK})
	ret, out = e.nodeport(in)
	translated(t, in, out, ret, tcpBE)
	if f := e.flows()[c(12)]; f.Closing {
		t.Errorf("closing after the client's FIN alone: %+v", f)
	}
	in = buildPacket(pktSpec{src: tcpBE, dst: snat[0], proto: ProtoTCP, tcpFlags: tcpFIN | tcpACK})
	if ret, _ := e.reply(in); ret != tcActRedirect {
		t.Fatalf("reply FIN: verdict %d", int32(ret))
	}
	if f := e.flows()[c(12)]; !f.Closing || !f.Replied {
		t.Errorf("not closing after FIN from both ends: %+v", f)
	}
	in = buildPacket(pktSpec{src: c(12), dst: tcpFE, proto: ProtoTCP, tcpFlags: tcpSYN})
	ret, out = e.nodeport(in)
	if p := translated(t, in, out, ret, tcpBE); p.src != snat[0] {
		t.Errorf("new connection on the tuple from %s, want %s", p.src, snat[0])
	}
	if f := e.flows()[c(12)]; f.Closing || f.Replied {
		t.Errorf("state not reset by a new SYN: %+v", f)
	}
}

// Both objects pinned in one directory use one kernel map each for frontends and backends.
func TestNodePortSharesMaps(t *testing.T) {
	e := newTestEnv(t)
	e.startServers([]netip.AddrPort{tcpA}, nil)
	d := e.load()
	cfg := e.config()
	cfg.ConntrackMapSize = 1024
	n, err := LoadNodePort(cfg, npConfig)
	if err != nil {
		t.Fatalf("LoadNodePort: %v", err)
	}
	defer n.Close()

	for _, m := range [][2]*ebpf.Map{{d.Maps.svc, n.objs.KprSvcV1}, {d.Maps.backends, n.objs.KprBackendsV1}} {
		a, err := m[0].Info()
		must(t, err)
		b, err := m[1].Info()
		must(t, err)
		idA, _ := a.ID()
		idB, _ := b.ID()
		if idA != idB {
			t.Errorf("%s: socket object's map %d, north-south object's %d", a.Name, idA, idB)
		}
	}

	// Written with the north-south object's types and handles, served by the socket programs.
	be := lbBackend{Addr: tcpA.Addr().As16(), Port: netPort(tcpA.Port()), Proto: uint8(ProtoTCP)}
	must(t, n.objs.KprBackendsV1.Update(uint32(7), &be, ebpf.UpdateAny))
	for slot, v := range []lbSvcValue{{Count: 1, SvcId: 70}, {SvcId: 7}} {
		k := lbSvcKey{Addr: vip4.As16(), Port: netPort(80), Proto: uint8(ProtoTCP), Scope: uint8(ScopeSocket), Slot: uint16(slot)}
		must(t, n.objs.KprSvcV1.Update(&k, &v, ebpf.UpdateAny))
	}
	ex, err := e.dialTCP(familyOf(tcpA), netip.AddrPortFrom(vip4, 80))
	must(t, err)
	if ex.backend != tcpA.String() {
		t.Errorf("connect to the VIP reached %q, want %s", ex.backend, tcpA)
	}
	svcs, err := d.Maps.Services()
	must(t, err)
	if s := svcs[ServiceKey{Addr: vip4, Port: 80, Proto: ProtoTCP}]; s.ID != 70 || !slices.Equal(s.Backends, []uint32{7}) {
		t.Errorf("socket object sees %+v", s)
	}
}

func TestNodePortConfig(t *testing.T) {
	e := newNodePortEnv(t, Config{}, NodePortConfig{SNATAddr4: npNode4})
	got, err := e.n.Maps.Config()
	must(t, err)
	want := NodePortConfig{SNATAddr4: npNode4, SNATPorts: DefaultSNATPorts, TCPTimeout: DefaultTCPTimeout,
		TCPSynTimeout: DefaultTCPSynTimeout, TCPCloseTimeout: DefaultTCPCloseTimeout, UDPTimeout: DefaultUDPTimeout}
	if got != want {
		t.Errorf("Config = %+v, want %+v", got, want)
	}
	full := NodePortConfig{SNATAddr4: npNode4, SNATAddr6: npNode6, SNATPorts: PortRange{62000, 62999}, HashSeed: 9,
		TCPTimeout: time.Hour, TCPSynTimeout: 30 * time.Second, TCPCloseTimeout: 5 * time.Second, UDPTimeout: 2 * time.Minute}
	must(t, e.n.Maps.SetConfig(full))
	if got, err := e.n.Maps.Config(); err != nil || got != full {
		t.Errorf("Config = %+v, %v, want %+v", got, err, full)
	}
	for _, bad := range []NodePortConfig{
		{SNATAddr4: npNode6},
		{SNATAddr6: npNode4},
		{SNATAddr6: netip.AddrFrom16(npNode4.As16())},
		{SNATPorts: PortRange{0, 10}},
		{SNATPorts: PortRange{62000, 61000}},
		{TCPTimeout: time.Millisecond},
	} {
		if err := e.n.Maps.SetConfig(bad); err == nil {
			t.Errorf("SetConfig(%+v) succeeded", bad)
		}
	}
	if got, err := e.n.Maps.Config(); err != nil || got != full {
		t.Errorf("a rejected config changed it: %+v, %v", got, err)
	}

	// OpenNodePortMaps reads what the loaded datapath has.
	m, err := OpenNodePortMaps(e.pinDir)
	must(t, err)
	defer m.Close()
	if got, err := m.Config(); err != nil || got != full || m.MaglevTableSize() != DefaultMaglevTableSize {
		t.Errorf("OpenNodePortMaps: %+v, %v, table size %d", got, err, m.MaglevTableSize())
	}
}

func tcxPrograms(t *testing.T, e *testEnv, ifindex int) []ebpf.ProgramID {
	t.Helper()
	var ids []ebpf.ProgramID
	must(t, e.do(func() error {
		res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		for _, p := range res.Programs {
			ids = append(ids, p.ID)
		}
		return nil
	}))
	return ids
}

func TestNodePortAttachRestartCleanup(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	attach := func(n *NodePort, ifindex int, h TCHook) {
		t.Helper()
		must(t, e.do(func() error { return n.AttachTC(ifindex, h) }))
	}
	attach(e.n, e.ext0, TCNodePort)
	must(t, e.do(func() error { return e.n.AttachTCByName("ext0", TCReply) }))
	attach(e.n, e.pod0, TCReply)
	attach(e.n, e.pod0, TCReply) // again: updated in place

	att, err := TCAttached(e.pinDir)
	must(t, err)
	if len(att) != 3 || att[0].Ifindex != min(e.ext0, e.pod0) {
		t.Fatalf("TCAttached = %+v", att)
	}
	progs := map[TCHook]ebpf.ProgramID{}
	for _, hook := range []TCHook{TCNodePort, TCReply} {
		p, err := e.n.program(hook)
		must(t, err)
		info, err := p.Info()
		must(t, err)
		progs[hook], _ = info.ID()
	}
	for _, a := range att {
		if a.ProgramID != progs[a.Hook] || a.Defunct {
			t.Errorf("attachment %+v, want program %d", a, progs[a.Hook])
		}
	}
	if got := tcxPrograms(t, e.testEnv, e.ext0); len(got) != 2 {
		t.Errorf("tcx ingress of ext0 runs %v", got)
	}
	linkIDs := func() map[string]link.ID {
		out := map[string]link.ID{}
		entries, err := os.ReadDir(filepath.Join(e.pinDir, linksDir))
		must(t, err)
		for _, en := range entries {
			if !strings.HasPrefix(en.Name(), tcPinPrefix) {
				continue
			}
			l, err := link.LoadPinnedLink(filepath.Join(e.pinDir, linksDir, en.Name()), nil)
			must(t, err)
			info, err := l.Info()
			l.Close()
			must(t, err)
			out[en.Name()] = info.ID
		}
		return out
	}
	before := linkIDs()

	// Restart: the same links run the new programs.
	cfg := e.config()
	cfg.ConntrackMapSize, cfg.MaglevMapSize = 4096, 64
	n2, err := LoadNodePort(cfg, npConfig)
	if err != nil {
		t.Fatalf("second LoadNodePort: %v", err)
	}
	defer n2.Close()
	attach(n2, e.ext0, TCNodePort)
	attach(n2, e.ext0, TCReply)
	attach(n2, e.pod0, TCReply)
	if after := linkIDs(); !maps.Equal(before, after) {
		t.Errorf("links replaced on restart: %v -> %v", before, after)
	}
	att2, err := TCAttached(e.pinDir)
	must(t, err)
	for i := range att2 {
		if att2[i].ProgramID == att[i].ProgramID {
			t.Errorf("%+v still runs the old program", att2[i])
		}
	}

	// Settings that the pinned maps cannot follow are refused, naming the setting.
	for _, bad := range []struct {
		mod  func(*Config)
		want string
	}{
		{func(c *Config) { c.ConntrackMapSize = 8192 }, "ConntrackMapSize"},
		{func(c *Config) { c.MaglevTableSize = 251 }, "MaglevTableSize"},
		{func(c *Config) { c.ServiceMapSize *= 2 }, "ServiceMapSize"},
		{func(c *Config) { c.MaglevTableSize = -1 }, "MaglevTableSize"},
	} {
		c := cfg
		bad.mod(&c)
		if _, err := LoadNodePort(c, npConfig); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("LoadNodePort with another %s: %v", bad.want, err)
		}
	}

	// A device that went away leaves a defunct link; a new device with its index gets a
	// new one.
	e.ip("link", "add", "gone0", "index", "4242", "type", "veth", "peer", "name", "gone0p")
	attach(n2, 4242, TCNodePort)
	e.ip("link", "del", "gone0")
	att3, err := TCAttached(e.pinDir)
	must(t, err)
	if a := att3[len(att3)-1]; a.Ifindex != 4242 || !a.Defunct {
		t.Errorf("after the device went away: %+v", a)
	}
	e.ip("link", "add", "new0", "index", "4242", "type", "veth", "peer", "name", "new0p")
	attach(n2, 4242, TCNodePort)
	if got := tcxPrograms(t, e.testEnv, 4242); len(got) != 1 || got[0] != att2[0].ProgramID {
		t.Errorf("tcx ingress of the new device runs %v, want [%d]", got, att2[0].ProgramID)
	}

	must(t, n2.DetachTC(e.pod0, TCReply))
	must(t, n2.DetachTC(e.pod0, TCReply)) // idempotent
	if got := tcxPrograms(t, e.testEnv, e.pod0); len(got) != 0 {
		t.Errorf("pod0 still runs %v", got)
	}

	must(t, Cleanup(e.pinDir))
	if _, err := os.Stat(e.pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pin dir still there after Cleanup: %v", err)
	}
	for _, ifindex := range []int{e.ext0, 4242} {
		if got := tcxPrograms(t, e.testEnv, ifindex); len(got) != 0 {
			t.Errorf("interface %d still runs %v after Cleanup", ifindex, got)
		}
	}
	if att, err := TCAttached(e.pinDir); err != nil || len(att) != 0 {
		t.Errorf("TCAttached after Cleanup: %v %v", att, err)
	}
	if _, err := OpenNodePortMaps(e.pinDir); err == nil {
		t.Errorf("OpenNodePortMaps after Cleanup succeeded")
	}
}

func TestProbeNodePort(t *testing.T) {
	requireRoot(t)
	if err := ProbeNodePort(); err != nil {
		t.Fatalf("ProbeNodePort: %v", err)
	}
}

func TestTCPinNames(t *testing.T) {
	for _, h := range []TCHook{TCNodePort, TCReply} {
		for _, i := range []int{1, 42, 1 << 30} {
			a, ok := parseTCPinName(tcPinName(h, i))
			if !ok || a.Hook != h || a.Ifindex != i {
				t.Errorf("%s %d: %+v %v", h, i, a, ok)
			}
		}
	}
	for _, name := range []string{"connect4", "tcx_nodeport_", "tcx_nodeport_x", "tcx_reply_0", "tcx_other_3", "tcx_reply_3_new"} {
		if a, ok := parseTCPinName(name); ok {
			t.Errorf("%s parsed as %+v", name, a)
		}
	}
}

// The north-south maps in bytes (docs/ARCHITECTURE.md): a change that moves these is a new
// schema version. The maps both objects declare must be declared identically.
func TestLBObjectMatchesSchema(t *testing.T) {
	lb, err := loadLb()
	must(t, err)
	sock, err := loadSock()
	must(t, err)
	want := map[string][3]int{ // key, value, max entries in the object
		lbMapKprLbCtV1:     {40, 52, DefaultConntrackMapSize},
		lbMapKprLbSnatV1:   {40, 44, DefaultConntrackMapSize},
		lbMapKprLbConfigV1: {4, 60, 1},
		lbMapKprLbStatsV1:  {4, 8, int(lbLbStatSTAT_MAX)},
		lbMapKprMaglevV1:   {4, 4, DefaultMaglevMapSize},
		// {prefixlen, svc_id, address}: the svc_id's 32 bits come first, matched whole.
		lbMapKprLbSrcRangesV1: {24, 1, MaxSourceRanges},
		// {client[16], svc_id, pad} -> {backend_id, last_used_sec}
		lbMapKprLbAffinityV1: {24, 8, DefaultAffinityMapSize},
		// port as the packet carries it -> marked
		lbMapKprLbReplyPortsV1: {4, 1, 65536},
	}
	for name, w := range want {
		ms := lb.Maps[name]
		if ms == nil {
			t.Fatalf("object has no map %s", name)
		}
		if got := [3]int{int(ms.KeySize), int(ms.ValueSize), int(ms.MaxEntries)}; got != w {
			t.Errorf("%s: key/value/entries %v, schema %v", name, got, w)
		}
		if ms.Pinning != ebpf.PinByName {
			t.Errorf("%s: not pinned by name", name)
		}
	}
	if in := lb.Maps[lbMapKprMaglevV1].InnerMap; in == nil || in.Type != ebpf.Array || in.KeySize != 4 || in.ValueSize != 4 || in.MaxEntries != DefaultMaglevTableSize {
		t.Errorf("maglev inner map %+v", in)
	}
	if !slices.Equal(slices.Sorted(maps.Keys(want)), slices.Sorted(slices.Values(lbMapNames))) {
		t.Errorf("lbMapNames %v", lbMapNames)
	}
	for _, name := range []string{lbMapKprSvcV1, lbMapKprBackendsV1, lbMapKprAffinityMatchV1} {
		a, b := lb.Maps[name], sock.Maps[name]
		if a.Type != b.Type || a.KeySize != b.KeySize || a.ValueSize != b.ValueSize || a.MaxEntries != b.MaxEntries ||
			a.Flags != b.Flags || a.Pinning != b.Pinning {
			t.Errorf("%s differs between the objects: %+v, %+v", name, a, b)
		}
	}
	// Generated twice from one header: the Go types must agree too.
	for _, pair := range [][2]any{{lbSvcKey{}, sockSvcKey{}}, {lbSvcValue{}, sockSvcValue{}}, {lbBackend{}, sockBackend{}}} {
		a, b := reflect.TypeOf(pair[0]), reflect.TypeOf(pair[1])
		if a.Size() != b.Size() || a.NumField() != b.NumField() {
			t.Errorf("%s and %s differ", a, b)
			continue
		}
		for i := range a.NumField() {
			fa, fb := a.Field(i), b.Field(i)
			if fa.Name != fb.Name || fa.Offset != fb.Offset || fa.Type.Size() != fb.Type.Size() {
				t.Errorf("%s.%s and %s.%s differ", a, fa.Name, b, fb.Name)
			}
		}
	}
}

// externalTrafficPolicy Local: a frontend with FlagPreserveClientIP is translated in the
// destination only, so the (local) backend sees the client; the reply from the backend,
// addressed to the client, goes back from the frontend. No SNAT address is needed for it.
func TestNodePortPreserveClientIP(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	e.programServices()
	m := e.d.Maps
	keyLocal := ServiceKey{Addr: npNode4, Port: 30082, Proto: ProtoTCP, Scope: ScopeExternal}
	keyLocalUDP := ServiceKey{Addr: npNode4, Port: 30054, Proto: ProtoUDP, Scope: ScopeExternal}
	keyLocal6 := ServiceKey{Addr: npNode6, Port: 30082, Proto: ProtoTCP, Scope: ScopeExternal}
	must(t, m.UpsertService(keyLocal, Service{ID: 31, Flags: FlagPreserveClientIP, Backends: []uint32{npBeA, npBeB}}, 0))
	must(t, m.UpsertService(keyLocalUDP, Service{ID: 32, Flags: FlagPreserveClientIP, Backends: []uint32{npBeUDP}}, 0))
	must(t, m.UpsertService(keyLocal6, Service{ID: 33, Flags: FlagPreserveClientIP, Backends: []uint32{npBe6}}, 0))

	cases := []struct {
		name     string
		client   netip.AddrPort
		frontend netip.AddrPort
		proto    Proto
		backends []netip.AddrPort
	}{
		{"tcp ipv4", netip.AddrPortFrom(npClient4, 45000), netip.AddrPortFrom(npNode4, 30082), ProtoTCP,
			[]netip.AddrPort{netip.AddrPortFrom(npPodA, 8080), netip.AddrPortFrom(npPodB, 8080)}},
		{"udp ipv4", netip.AddrPortFrom(npClient4, 45001), netip.AddrPortFrom(npNode4, 30054), ProtoUDP,
			[]netip.AddrPort{netip.AddrPortFrom(npPodA, 5353)}},
		{"tcp ipv6", netip.AddrPortFrom(npClient6, 45002), netip.AddrPortFrom(npNode6, 30082), ProtoTCP,
			[]netip.AddrPort{netip.AddrPortFrom(npPod6, 8080)}},
	}
	check := func(t *testing.T, in, out []byte, ret uint32, client netip.AddrPort, backends []netip.AddrPort) packet {
		t.Helper()
		if ret != tcActRedirect {
			t.Fatalf("verdict %d, want TC_ACT_REDIRECT", int32(ret))
		}
		pin, err := parsePacket(in)
		must(t, err)
		p := checkChecksums(t, out, false)
		if !slices.Contains(backends, p.dst) || p.src != client {
			t.Fatalf("%s -> %s, want %s -> one of %v", p.src, p.dst, client, backends)
		}
		if p.ttl != pin.ttl-1 || !bytes.Equal(p.dstMAC, podMACs[p.dst.Addr()]) || !bytes.Equal(p.payload, pin.payload) {
			t.Errorf("ttl %d MAC %s payload %q", p.ttl, p.dstMAC, p.payload)
		}
		return p
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for i, flags := range []uint8{tcpSYN, tcpACK | tcpPSH} {
				in := buildPacket(pktSpec{src: tc.client, dst: tc.frontend, proto: tc.proto, tcpFlags: flags, payload: []byte(fmt.Sprintf("request %d", i))})
				ret, out := e.nodeport(in)
				p := check(t, in, out, ret, tc.client, tc.backends)

				reply := buildPacket(pktSpec{src: p.dst, dst: tc.client, proto: tc.proto, tcpFlags: tcpACK,
					payload: []byte("answer"), srcMAC: podMACs[p.dst.Addr()], dstMAC: pod0MAC})
				ret, out = e.reply(reply)
				if ret != tcActRedirect {
					t.Fatalf("reply verdict %d, want TC_ACT_REDIRECT", int32(ret))
				}
				r := checkChecksums(t, out, false)
				if r.src != tc.frontend || r.dst != tc.client || string(r.payload) != "answer" {
					t.Errorf("reply %s -> %s %q, want %s -> %s", r.src, r.dst, r.payload, tc.frontend, tc.client)
				}
			}
			f, ok := e.flows()[tc.client]
			if !ok || f.SNAT != tc.client || f.Frontend != tc.frontend {
				t.Errorf("flow %+v (present %v), want the client %s as its own source", f, ok, tc.client)
			}
		})
	}

	t.Run("a reply of the backend to someone else passes untouched", func(t *testing.T) {
		in := buildPacket(pktSpec{src: netip.AddrPortFrom(npPodA, 8080), dst: netip.AddrPortFrom(npClient4, 45999), proto: ProtoTCP, tcpFlags: tcpACK})
		ret, out := e.reply(in)
		untouched(t, "unrelated reply", in, out, ret)
	})

	t.Run("served without a SNAT address, unlike a SNAT frontend", func(t *testing.T) {
		must(t, e.n.Maps.SetConfig(NodePortConfig{HashSeed: npConfig.HashSeed}))
		defer func() { must(t, e.n.Maps.SetConfig(npConfig)) }()
		c := netip.AddrPortFrom(npClient4, 45100)
		in := buildPacket(pktSpec{src: c, dst: netip.AddrPortFrom(npNode4, 30082), proto: ProtoTCP, tcpFlags: tcpSYN})
		ret, out := e.nodeport(in)
		check(t, in, out, ret, c, cases[0].backends)
		in = buildPacket(pktSpec{src: c, dst: netip.AddrPortFrom(npNode4, 30080), proto: ProtoTCP, tcpFlags: tcpSYN})
		if ret, _ := e.nodeport(in); ret != tcActShot {
			t.Errorf("SNAT frontend without a SNAT address: verdict %d, want TC_ACT_SHOT", int32(ret))
		}
	})
}
