package bpf

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"
)

// buildEcho is an ICMP (ICMPv6) echo request (or another type) from src to dst, checksums set.
func buildEcho(src, dst netip.Addr, typ byte, options []byte) []byte {
	icmp := []byte{typ, 0, 0, 0, 0x12, 0x34, 0, 7}
	icmp = append(icmp, []byte("ping payload 0123456789")...)
	var l3 []byte
	if src.Is4() {
		ihl := ipv4Len + len(options)
		l3 = make([]byte, ihl)
		l3[0] = 0x40 | byte(ihl/4)
		binary.BigEndian.PutUint16(l3[2:], uint16(ihl+len(icmp)))
		l3[8], l3[9] = 63, 1
		s4, d4 := src.As4(), dst.As4()
		copy(l3[12:], s4[:])
		copy(l3[16:], d4[:])
		copy(l3[20:], options)
		binary.BigEndian.PutUint16(l3[10:], ^fold(sum(l3)))
		binary.BigEndian.PutUint16(icmp[2:], ^fold(sum(icmp)))
	} else {
		l3 = make([]byte, ipv6Len)
		l3[0] = 0x60
		binary.BigEndian.PutUint16(l3[4:], uint16(len(icmp)))
		l3[6], l3[7] = 58, 63
		s6, d6 := src.As16(), dst.As16()
		copy(l3[8:], s6[:])
		copy(l3[24:], d6[:])
		binary.BigEndian.PutUint16(icmp[2:], ^fold(pseudoSum(l3, len(icmp))+sum(icmp)))
	}
	eth := make([]byte, ethHdrLen)
	copy(eth[0:], nodeMAC)
	copy(eth[6:], clientMAC)
	if src.Is4() {
		binary.BigEndian.PutUint16(eth[12:], 0x0800)
	} else {
		binary.BigEndian.PutUint16(eth[12:], 0x86dd)
	}
	return append(append(eth, l3...), icmp...)
}

// Ping to an address with an echo marker is answered by tc_nodeport itself: the request turned
// into a reply from that address, checksums right, back out of the device; anything else
// ICMP is left alone.
func TestNodePortEcho(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	e.programServices()
	vip6 := netip.MustParseAddr("fd6b:7072:51::20")
	for _, a := range []netip.Addr{npLBVIP, vip6} {
		must(t, e.d.Maps.UpsertService(EchoMarker(a), Service{}, 0))
	}
	for _, c := range []struct {
		name     string
		src, dst netip.Addr
		reply    byte
	}{{"ipv4", npClient4, npLBVIP, 0}, {"ipv6", npClient6, vip6, 129}} {
		t.Run(c.name, func(t *testing.T) {
			req := byte(8)
			if c.src.Is6() {
				req = 128
			}
			in := buildEcho(c.src, c.dst, req, nil)
			ret, out := e.nodeport(in)
			if ret != tcActRedirect {
				t.Fatalf("verdict %d, want TC_ACT_REDIRECT (the reply)", int32(ret))
			}
			if len(out) != len(in) || !bytes.Equal(out[0:6], in[6:12]) || !bytes.Equal(out[6:12], in[0:6]) {
				t.Fatalf("frame %x, want the request's with the MACs swapped", out)
			}
			l3 := out[ethHdrLen:]
			var icmp []byte
			var src, dst netip.Addr
			if c.src.Is4() {
				if s := fold(sum(l3[:ipv4Len])); s != 0xffff || l3[8] != 64 {
					t.Errorf("IPv4 header sums to %#04x, TTL %d: want 0xffff and 64", s, l3[8])
				}
				src, dst = netip.AddrFrom4([4]byte(l3[12:16])), netip.AddrFrom4([4]byte(l3[16:20]))
				icmp = l3[ipv4Len:]
				if s := fold(sum(icmp)); s != 0xffff {
					t.Errorf("ICMP checksum: sums to %#04x", s)
				}
			} else {
				if l3[7] != 64 {
					t.Errorf("hop limit %d, want 64", l3[7])
				}
				src, dst = netip.AddrFrom16([16]byte(l3[8:24])), netip.AddrFrom16([16]byte(l3[24:40]))
				icmp = l3[ipv6Len:]
				if s := fold(pseudoSum(l3[:ipv6Len], len(icmp)) + sum(icmp)); s != 0xffff {
					t.Errorf("ICMPv6 checksum: sums to %#04x", s)
				}
			}
			if src != c.dst || dst != c.src || icmp[0] != c.reply || icmp[1] != 0 {
				t.Errorf("%s -> %s type %d code %d, want %s -> %s type %d", src, dst, icmp[0], icmp[1], c.dst, c.src, c.reply)
			}
			pin := in[len(in)-len(icmp):]
			if !bytes.Equal(icmp[4:], pin[4:]) {
				t.Errorf("identifier, sequence or data changed: %x, want %x", icmp[4:], pin[4:])
			}
		})
	}
	for _, c := range []struct {
		name string
		in   []byte
	}{
		{"an address without a marker", buildEcho(npClient4, npNode4, 8, nil)},
		{"an echo reply", buildEcho(npClient4, npLBVIP, 0, nil)},
		{"IPv4 options", buildEcho(npClient4, npLBVIP, 8, []byte{1, 1, 1, 0})},
		{"an IPv6 address without a marker", buildEcho(npClient6, netip.MustParseAddr("fd6b:7072:51::21"), 128, nil)},
	} {
		ret, out := e.nodeport(c.in)
		untouched(t, c.name, c.in, out, ret)
	}
	if s := e.stats(); s.EchoReplies != 2 {
		t.Errorf("EchoReplies %d, want 2", s.EchoReplies)
	}
}

// Answers the node makes up (echo replies, refusals) share a limit of 1,000 a second with
// bursts of 50, so a flood with forged sources cannot use the node as a reflector: 200 pings
// back to back get about the burst answered and the rest dropped and counted, a refusal in
// the same instant is dropped too, and a moment later answers come again.
func TestNodePortAnswerRateLimit(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	e.programServices()
	must(t, e.d.Maps.UpsertService(EchoMarker(npLBVIP), Service{}, 0))
	must(t, e.d.Maps.UpsertService(ServiceKey{Addr: npLBVIP, Port: 8443, Proto: ProtoTCP, Scope: ScopeExternal}, Service{ID: 61}, 0))
	ping := buildEcho(npClient4, npLBVIP, 8, nil)
	syn := buildPacket(pktSpec{src: netip.AddrPortFrom(npClient4, 48000), dst: netip.AddrPortFrom(npLBVIP, 8443), proto: ProtoTCP, tcpFlags: tcpSYN})

	answered := 0
	start := time.Now()
	for range 200 {
		if ret, _ := e.nodeport(ping); ret == tcActRedirect {
			answered++
		}
	}
	// The burst, plus one answer per millisecond the calls took (with a little slack).
	refill := int(time.Since(start)/time.Millisecond) + 2
	s := e.stats()
	if answered < 50 || answered > 50+refill || s.RateLimited != uint64(200-answered) {
		t.Fatalf("200 pings back to back in %v: %d answered, %d rate-limited; want the burst of 50 plus at most %d refilled answered, the rest counted",
			time.Since(start).Round(time.Millisecond), answered, s.RateLimited, refill)
	}
	// Refusals draw on the same budget: of ten SYNs right after the flood, at most the refill
	// of the time they take is answered.
	made := 0
	start = time.Now()
	for range 10 {
		if ret, _ := e.nodeport(syn); ret == tcActRedirect {
			made++
		}
	}
	if refill := int(time.Since(start)/time.Millisecond) + 2; made > refill {
		t.Errorf("ten refusals right after the flood: %d made in %v, want at most %d (over the limit)", made, time.Since(start).Round(time.Millisecond), refill)
	}
	time.Sleep(100 * time.Millisecond)
	if ret, _ := e.nodeport(ping); ret != tcActRedirect {
		t.Errorf("a ping 100 ms later: verdict %d, want an answer", int32(ret))
	}
	if ret, _ := e.nodeport(syn); ret != tcActRedirect {
		t.Errorf("a refusal 100 ms later: verdict %d, want the RST", int32(ret))
	}
}
