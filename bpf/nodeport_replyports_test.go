package bpf

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// TestNodePortReplyPorts: tc_nodeport_reply, which runs on every packet from the pods, stops
// at packets from ports that no translated flow's backend used (kpr_lb_reply_ports_v1), and a
// kpr that creates that map over an older kpr's flows marks their ports, so their replies are
// still translated after the upgrade.
func TestNodePortReplyPorts(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	e.programServices()
	client := netip.AddrPortFrom(npClient4, 40000)
	frontend := netip.AddrPortFrom(npNode4, 30080)
	in := buildPacket(pktSpec{src: client, dst: frontend, proto: ProtoTCP, tcpFlags: tcpSYN})
	ret, out := e.nodeport(in)
	first := translated(t, in, out, ret, netip.AddrPortFrom(npPodA, 8080), netip.AddrPortFrom(npPodB, 8080))
	reply := buildPacket(pktSpec{src: first.dst, dst: first.src, proto: ProtoTCP, tcpFlags: tcpSYN | tcpACK,
		srcMAC: podMACs[first.dst.Addr()], dstMAC: pod0MAC})
	port := func() uint32 { // the map's index: the port as the packet carries it, read natively
		p := first.dst.Port()
		return uint32(p>>8 | p<<8&0xff00)
	}()
	marked := func() uint8 {
		t.Helper()
		var v uint8
		if err := e.n.Maps.replyPorts.Lookup(port, &v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	answered := func(what string) {
		t.Helper()
		ret, out := e.reply(reply)
		if ret != tcActRedirect {
			t.Fatalf("%s: verdict %d, want TC_ACT_REDIRECT", what, int32(ret))
		}
		if p := checkChecksums(t, out, false); p.src != frontend || p.dst != client {
			t.Errorf("%s: reply %s -> %s, want %s -> %s", what, p.src, p.dst, frontend, client)
		}
	}

	if marked() != 1 {
		t.Fatalf("the new flow did not mark its backend's port %d", first.dst.Port())
	}
	answered("with the port marked")

	// As an older kpr left it: the flow, and no mark. The reply is not looked up.
	if err := e.n.Maps.replyPorts.Put(port, uint8(0)); err != nil {
		t.Fatal(err)
	}
	ret, out = e.reply(reply)
	untouched(t, "the reply from an unmarked port", reply, out, ret)
	for _, fam := range []netip.AddrPort{netip.AddrPortFrom(npPod6, 8080)} {
		in := buildPacket(pktSpec{src: fam, dst: netip.MustParseAddrPort("[fd6b:7072::100]:40000"), proto: ProtoUDP, payload: []byte("x")})
		ret, out := e.reply(in)
		untouched(t, "IPv6 UDP from an unmarked port", in, out, ret)
	}

	// The upgrade: the map is created new over the pinned flows and seeded from them.
	e.n.Close()
	if err := os.Remove(filepath.Join(e.pinDir, lbMapKprLbReplyPortsV1)); err != nil {
		t.Fatal(err)
	}
	n, err := LoadNodePort(e.cfg, e.np)
	if err != nil {
		t.Fatalf("LoadNodePort over the older pins: %v", err)
	}
	e.n = n
	if marked() != 1 {
		t.Fatal("the reverse entry's port was not seeded")
	}
	answered("after the upgrade")
}

// TestRunStatsSharedProgram: the reply program on two devices is one program to the kernel,
// with one count; RunStats lists it once, so a sum over its entries counts every run once.
func TestRunStatsSharedProgram(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		t.Skipf("BPF run-time statistics: %v", err)
	}
	defer stats.Close()
	must(t, e.do(func() error {
		if err := e.n.AttachTC(e.pod0, TCReply); err != nil {
			return err
		}
		return e.n.AttachTC(e.ext0, TCReply)
	}))
	in := buildPacket(pktSpec{src: netip.AddrPortFrom(npPodA, 8080), dst: netip.AddrPortFrom(npClient4, 40000), proto: ProtoTCP, tcpFlags: tcpACK})
	for range 5 {
		e.reply(in)
	}
	st, err := RunStats(e.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	var entries []string
	var runs uint64
	for name, s := range st {
		if strings.HasPrefix(name, "tcx_reply_") {
			entries = append(entries, name)
			runs += s.RunCount
		}
	}
	// The devices' own packets (IPv6 neighbour discovery after link-up) may add a run or
	// two; counting the program once per link would give at least 10.
	if len(entries) != 1 || runs < 5 || runs >= 10 {
		t.Fatalf("reply program entries %v with %d runs, want one entry with the 5 runs (and at most a few of the devices' own packets)", entries, runs)
	}
}
