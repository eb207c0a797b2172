package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Frontends without endpoints: kube-proxy rejects, so the client must get a TCP RST or an
// ICMP port unreachable from the address it sent to, back out of the device it came in on,
// with every checksum right; with FlagUnreachable (endpoints exist, none usable here, as
// under externalTrafficPolicy Local) the packet is dropped.
func TestNodePortReject(t *testing.T) {
	e := newNodePortEnv(t, Config{}, npConfig)
	e.ifindexes()
	e.programServices()
	m := e.d.Maps
	fe4 := netip.AddrPortFrom(npLBVIP, 8443)
	fe6 := netip.AddrPortFrom(npNode6, 30443)
	for i, k := range []ServiceKey{
		{Addr: fe4.Addr(), Port: fe4.Port(), Proto: ProtoTCP, Scope: ScopeExternal},
		{Addr: fe4.Addr(), Port: fe4.Port(), Proto: ProtoUDP, Scope: ScopeExternal},
		{Addr: fe6.Addr(), Port: fe6.Port(), Proto: ProtoTCP, Scope: ScopeExternal},
		{Addr: fe6.Addr(), Port: fe6.Port(), Proto: ProtoUDP, Scope: ScopeExternal},
	} {
		must(t, m.UpsertService(k, Service{ID: uint32(41 + i)}, 0))
	}
	c4 := netip.AddrPortFrom(npClient4, 40001)
	c6 := netip.AddrPortFrom(npClient6, 40001)
	mss := []byte{2, 4, 0x05, 0xb4, 1, 1, 4, 2} // MSS 1460, NOP, NOP, SACK permitted

	rst := func(t *testing.T, in []byte) packet {
		t.Helper()
		ret, out := e.nodeport(in)
		if ret != tcActRedirect {
			t.Fatalf("verdict %d, want TC_ACT_REDIRECT (the RST sent back)", int32(ret))
		}
		pin, err := parsePacket(in)
		must(t, err)
		p := checkChecksums(t, out, false)
		if p.src != pin.dst || p.dst != pin.src {
			t.Errorf("RST %s -> %s, want %s -> %s", p.src, p.dst, pin.dst, pin.src)
		}
		if !bytes.Equal(p.dstMAC, pin.srcMAC) || !bytes.Equal(p.srcMAC, pin.dstMAC) {
			t.Errorf("MACs %s -> %s, want %s -> %s", p.srcMAC, p.dstMAC, pin.dstMAC, pin.srcMAC)
		}
		if p.ttl != 64 || len(p.l4) != tcpLen || len(p.payload) != 0 || len(out) != ethHdrLen+len(p.l3)+tcpLen {
			t.Errorf("TTL %d, TCP segment %d bytes, frame %d bytes: want TTL 64 and a bare 20-byte header", p.ttl, len(p.l4), len(out))
		}
		if w := binary.BigEndian.Uint16(p.l4[14:]); w != 0 {
			t.Errorf("window %d, want 0", w)
		}
		return p
	}
	seqAck := func(p packet) (uint32, uint32) {
		return binary.BigEndian.Uint32(p.l4[4:]), binary.BigEndian.Uint32(p.l4[8:])
	}

	for _, c := range []struct {
		name     string
		src, dst netip.AddrPort
	}{{"ipv4", c4, fe4}, {"ipv6", c6, fe6}} {
		t.Run("tcp syn with options "+c.name, func(t *testing.T) {
			in := buildPacket(pktSpec{src: c.src, dst: c.dst, proto: ProtoTCP, tcpFlags: tcpSYN, tcpOpts: mss})
			p := rst(t, in)
			seq, ack := seqAck(p)
			if p.tcpFlags != tcpRST|tcpACK || seq != 0 || ack != 0x01020304+1 {
				t.Errorf("flags %#x seq %d ack %#x, want RST|ACK, 0, %#x", p.tcpFlags, seq, ack, 0x01020304+1)
			}
		})
		t.Run("tcp data with ack "+c.name, func(t *testing.T) {
			payload := bytes.Repeat([]byte("0123456789abcdefX"), 90) // 1530 bytes: six chunks
			in := buildPacket(pktSpec{src: c.src, dst: c.dst, proto: ProtoTCP, tcpFlags: tcpACK | tcpPSH, payload: payload})
			p := rst(t, in)
			seq, _ := seqAck(p)
			if p.tcpFlags != tcpRST || seq != 0x0a0b0c0d {
				t.Errorf("flags %#x seq %#x, want RST and the segment's ack %#x", p.tcpFlags, seq, 0x0a0b0c0d)
			}
		})
		t.Run("tcp fin without ack "+c.name, func(t *testing.T) {
			in := buildPacket(pktSpec{src: c.src, dst: c.dst, proto: ProtoTCP, tcpFlags: tcpFIN, payload: []byte("abc")})
			_, ack := seqAck(rst(t, in))
			if ack != 0x01020304+3+1 {
				t.Errorf("ack %#x, want the end of the segment %#x", ack, 0x01020304+3+1)
			}
		})
		t.Run("udp "+c.name, func(t *testing.T) {
			in := buildPacket(pktSpec{src: c.src, dst: c.dst, proto: ProtoUDP, payload: []byte("query")})
			ret, out := e.nodeport(in)
			checkUnreachable(t, in, out, ret)
		})
		t.Run("udp checksum left to the sender's device "+c.name, func(t *testing.T) {
			// A CHECKSUM_PARTIAL datagram: the field holds the pseudo-header sum, and the
			// device that sends the answer completes it from the L4 offset on.
			in := buildPacket(pktSpec{src: c.src, dst: c.dst, proto: ProtoUDP, payload: []byte("a datagram longer than the answer will be, to be trimmed")})
			pin, err := parsePacket(in)
			must(t, err)
			l4off := len(in) - len(pin.l4)
			binary.BigEndian.PutUint16(in[l4off+6:], fold(pseudoSum(pin.l3, len(pin.l4))))
			ret, out := e.nodeport(in)
			if ret != tcActRedirect {
				t.Fatalf("verdict %d, want TC_ACT_REDIRECT", int32(ret))
			}
			completed := bytes.Clone(out)
			binary.BigEndian.PutUint16(completed[l4off+6:], ^fold(sum(completed[l4off:])))
			checkUnreachable(t, in, completed, ret)
		})
	}

	t.Run("a RST is not answered", func(t *testing.T) {
		in := buildPacket(pktSpec{src: c4, dst: fe4, proto: ProtoTCP, tcpFlags: tcpRST})
		if ret, _ := e.nodeport(in); ret != tcActShot {
			t.Errorf("verdict %d, want TC_ACT_SHOT", int32(ret))
		}
	})
	t.Run("with FlagUnreachable the packet is dropped", func(t *testing.T) {
		in := buildPacket(pktSpec{src: c4, dst: netip.AddrPortFrom(npNode4, npKeyEmpty.Port), proto: ProtoTCP, tcpFlags: tcpSYN})
		if ret, _ := e.nodeport(in); ret != tcActShot {
			t.Errorf("verdict %d, want TC_ACT_SHOT", int32(ret))
		}
	})
	if s := e.stats(); s.Rejected != 10 {
		t.Errorf("Rejected counter %d, want 10 (five answers in each family)", s.Rejected)
	}
}

// checkUnreachable checks an ICMP (ICMPv6) port unreachable answering the UDP datagram in:
// addresses, type and code, checksums, and the quoted IP header and UDP header.
func checkUnreachable(t *testing.T, in, out []byte, ret uint32) {
	t.Helper()
	if ret != tcActRedirect {
		t.Fatalf("verdict %d, want TC_ACT_REDIRECT (the ICMP sent back)", int32(ret))
	}
	pin, err := parsePacket(in)
	must(t, err)
	if !bytes.Equal(out[0:6], in[6:12]) || !bytes.Equal(out[6:12], in[0:6]) || !bytes.Equal(out[12:14], in[12:14]) {
		t.Errorf("Ethernet header %x, want the client's with the addresses swapped %x", out[:14], in[:14])
	}
	l3 := out[ethHdrLen:]
	var icmp []byte
	var src, dst netip.Addr
	var wantType, wantCode byte
	var quoteIP []byte
	if pin.l3[0]>>4 == 4 {
		if len(l3) < ipv4Len || l3[0] != 0x45 || l3[9] != 1 || l3[8] != 64 {
			t.Fatalf("IPv4 header %x: want version 4, 20 bytes, ICMP, TTL 64", l3[:min(len(l3), 20)])
		}
		if s := fold(sum(l3[:ipv4Len])); s != 0xffff {
			t.Errorf("IPv4 header checksum wrong: %#04x", s)
		}
		tot := int(binary.BigEndian.Uint16(l3[2:]))
		if tot != len(l3) || tot != ipv4Len+8+ipv4Len+8 {
			t.Fatalf("IPv4 total length %d, frame carries %d, want %d", tot, len(l3), ipv4Len+8+ipv4Len+8)
		}
		src, dst = netip.AddrFrom4([4]byte(l3[12:16])), netip.AddrFrom4([4]byte(l3[16:20]))
		icmp = l3[ipv4Len:tot]
		if s := fold(sum(icmp)); s != 0xffff {
			t.Errorf("ICMP checksum wrong: message sums to %#04x\n%x", s, out)
		}
		wantType, wantCode, quoteIP = 3, 3, in[ethHdrLen:ethHdrLen+ipv4Len]
	} else {
		if len(l3) < ipv6Len || l3[6] != 58 || l3[7] != 64 {
			t.Fatalf("IPv6 header %x: want ICMPv6, hop limit 64", l3[:min(len(l3), 40)])
		}
		plen := int(binary.BigEndian.Uint16(l3[4:]))
		if plen != len(l3)-ipv6Len || plen != 8+ipv6Len+8 {
			t.Fatalf("IPv6 payload length %d, frame carries %d, want %d", plen, len(l3)-ipv6Len, 8+ipv6Len+8)
		}
		src, dst = netip.AddrFrom16([16]byte(l3[8:24])), netip.AddrFrom16([16]byte(l3[24:40]))
		icmp = l3[ipv6Len:]
		if s := fold(pseudoSum(l3[:ipv6Len], len(icmp)) + sum(icmp)); s != 0xffff {
			t.Errorf("ICMPv6 checksum wrong: message and pseudo-header sum to %#04x\n%x", s, out)
		}
		wantType, wantCode, quoteIP = 1, 4, in[ethHdrLen:ethHdrLen+ipv6Len]
	}
	if src != pin.dst.Addr() || dst != pin.src.Addr() {
		t.Errorf("ICMP %s -> %s, want %s -> %s", src, dst, pin.dst.Addr(), pin.src.Addr())
	}
	if icmp[0] != wantType || icmp[1] != wantCode {
		t.Errorf("ICMP type %d code %d, want %d %d", icmp[0], icmp[1], wantType, wantCode)
	}
	quote := icmp[8:]
	if !bytes.Equal(quote[:len(quoteIP)], quoteIP) || !bytes.Equal(quote[len(quoteIP):], pin.l4[:8]) {
		t.Errorf("quoted %x, want the client's IP header and UDP header %x %x", quote, quoteIP, pin.l4[:8])
	}
}

// TestNodePortRejectTraffic: real clients in their own namespace connect to frontends
// without endpoints through the attached tc program and must fail at once with
// ECONNREFUSED, with TX checksum offload on (the kernel hands the program CHECKSUM_PARTIAL
// packets, whose answers must still come out right) and off. What reaches the client is
// captured and its checksums checked from scratch.
func TestNodePortRejectTraffic(t *testing.T) {
	e, client, _ := newTrafficEnv(t)
	m := e.d.Maps
	targets := map[string]netip.AddrPort{
		"tcp": netip.AddrPortFrom(npNode4, 30444), "udp": netip.AddrPortFrom(npNode4, 30444),
		"tcp6": netip.AddrPortFrom(npNode6, 30444), "udp6": netip.AddrPortFrom(npNode6, 30444),
	}
	for i, k := range []ServiceKey{
		{Addr: npNode4, Port: 30444, Proto: ProtoTCP, Scope: ScopeExternal},
		{Addr: npNode4, Port: 30444, Proto: ProtoUDP, Scope: ScopeExternal},
		{Addr: npNode6, Port: 30444, Proto: ProtoTCP, Scope: ScopeExternal},
		{Addr: npNode6, Port: 30444, Proto: ProtoUDP, Scope: ScopeExternal},
	} {
		must(t, m.UpsertService(k, Service{ID: uint32(600 + i)}, 0))
	}
	for _, offload := range []bool{true, false} {
		t.Run(fmt.Sprintf("tx checksum offload %v", offload), func(t *testing.T) {
			setTxChecksum(t, client, "ext0p", offload)
			toClient := startCapture(t, client, "ext0p")
			for _, name := range []string{"tcp", "tcp6", "udp", "udp6"} {
				dst := targets[name]
				start := time.Now()
				err := client.do(func() error {
					network := strings.TrimSuffix(name, "6")
					c, err := net.DialTimeout(network, dst.String(), 2*time.Second)
					if err != nil {
						return err
					}
					defer c.Close()
					c.SetDeadline(time.Now().Add(2 * time.Second))
					if _, err := c.Write([]byte("ping")); err != nil {
						return err
					}
					_, err = c.Read(make([]byte, 64))
					return err
				})
				if !errors.Is(err, unix.ECONNREFUSED) || time.Since(start) > time.Second {
					t.Errorf("%s to %s: %v after %v, want ECONNREFUSED at once", name, dst, err, time.Since(start).Round(time.Millisecond))
				}
			}
			n, partial := 0, 0
			for _, cp := range toClient.stop() {
				kind, errs := checkRefusal(cp.data, cp.partial)
				if kind == "" {
					continue
				}
				n++
				if cp.partial {
					partial++
				}
				for _, e := range errs {
					t.Errorf("%s (partial %v): %s\n%x", kind, cp.partial, e, cp.data)
				}
			}
			if n < 4 {
				t.Errorf("captured %d refusals at the client, want 4", n)
			}
			if offload && partial == 0 {
				t.Error("no refusal reached the client CHECKSUM_PARTIAL: the offloaded path went untested")
			}
		})
	}
	if s := e.stats(); s.Rejected < 8 {
		t.Errorf("Rejected counter %d, want at least 8", s.Rejected)
	}
}

// checkRefusal recognises a TCP RST or an ICMP/ICMPv6 port unreachable in a captured frame and
// checks its checksums from scratch, after doing what the transmitting device would have done
// if the kernel handed it over CHECKSUM_PARTIAL: a RST's TCP checksum completed over the
// segment; for an ICMP message made from a UDP datagram, UDP's checksum offset (6) completed
// over the message. kind is "" for anything else.
func checkRefusal(frame []byte, partial bool) (kind string, errs []string) {
	b := append([]byte(nil), frame...)
	if len(b) < ethHdrLen+ipv6Len {
		return "", nil
	}
	l3 := b[ethHdrLen:]
	var proto byte
	var l4 []byte
	var pseudo uint32
	switch l3[0] >> 4 {
	case 4:
		ihl := int(l3[0]&0xf) * 4
		tot := int(binary.BigEndian.Uint16(l3[2:]))
		if tot > len(l3) || tot < ihl {
			return "", nil
		}
		proto, l4 = l3[9], l3[ihl:tot]
		if s := fold(sum(l3[:ihl])); s != 0xffff {
			errs = append(errs, fmt.Sprintf("IPv4 header checksum: sums to %#04x", s))
		}
		pseudo = pseudoSum(l3, len(l4))
	case 6:
		plen := int(binary.BigEndian.Uint16(l3[4:]))
		if ipv6Len+plen > len(l3) {
			return "", nil
		}
		proto, l4 = l3[6], l3[ipv6Len:ipv6Len+plen]
		pseudo = pseudoSum(l3[:ipv6Len], len(l4))
	default:
		return "", nil
	}
	complete := func(off int) {
		if partial {
			binary.BigEndian.PutUint16(l4[off:], ^fold(sum(l4)))
		}
	}
	switch {
	case proto == 6 && len(l4) >= tcpLen && l4[13]&tcpRST != 0:
		kind = "RST"
		complete(16)
		if s := fold(pseudo + sum(l4)); s != 0xffff {
			errs = append(errs, fmt.Sprintf("TCP checksum: sums to %#04x", s))
		}
	case proto == 1 && len(l4) >= 8 && l4[0] == 3 && l4[1] == 3:
		kind = "ICMP port unreachable"
		complete(6)
		if s := fold(sum(l4)); s != 0xffff {
			errs = append(errs, fmt.Sprintf("ICMP checksum: sums to %#04x", s))
		}
	case proto == 58 && len(l4) >= 8 && l4[0] == 1 && l4[1] == 4:
		kind = "ICMPv6 port unreachable"
		complete(6)
		if s := fold(pseudo + sum(l4)); s != 0xffff {
			errs = append(errs, fmt.Sprintf("ICMPv6 checksum: sums to %#04x", s))
		}
	}
	return kind, errs
}
