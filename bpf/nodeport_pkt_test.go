package bpf

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"testing"
)

// A small packet builder and parser for the tc program tests: Ethernet, IPv4 (with options)
// or IPv6, TCP or UDP. Checksums are computed from scratch, never incrementally, so they are
// an independent reference for the datapath's incremental updates.

const (
	ethHdrLen = 14
	ipv4Len   = 20
	ipv6Len   = 40
	tcpLen    = 20
	udpLen    = 8

	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpPSH = 0x08
	tcpACK = 0x10
)

// tc verdicts as BPF_PROG_RUN returns them (uint32).
const (
	tcActUnspec   = ^uint32(0) // TC_ACT_UNSPEC (-1), TCX_NEXT: "not mine"
	tcActOK       = 0
	tcActShot     = 2
	tcActRedirect = 7
)

var (
	clientMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x64}
	nodeMAC   = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x0b}
)

type pktSpec struct {
	src, dst netip.AddrPort
	proto    Proto
	tcpFlags uint8
	tcpOpts  []byte // TCP options, a multiple of 4 bytes
	payload  []byte
	ttl      uint8  // 0: 64
	options  []byte // IPv4 options, a multiple of 4 bytes
	fragOff  uint16 // IPv4 flags and fragment offset field
	noCsum   bool   // UDP over IPv4 without checksum (0)
	srcMAC   net.HardwareAddr
	dstMAC   net.HardwareAddr
}

func buildPacket(s pktSpec) []byte {
	if s.ttl == 0 {
		s.ttl = 64
	}
	if s.srcMAC == nil {
		s.srcMAC = clientMAC
	}
	if s.dstMAC == nil {
		s.dstMAC = nodeMAC
	}
	var l4 []byte
	switch s.proto {
	case ProtoTCP:
		l4 = make([]byte, tcpLen+len(s.tcpOpts), tcpLen+len(s.tcpOpts)+len(s.payload))
		binary.BigEndian.PutUint16(l4[0:], s.src.Port())
		binary.BigEndian.PutUint16(l4[2:], s.dst.Port())
		binary.BigEndian.PutUint32(l4[4:], 0x01020304) // seq
		if s.tcpFlags&tcpACK != 0 {
			binary.BigEndian.PutUint32(l4[8:], 0x0a0b0c0d)
		}
		copy(l4[tcpLen:], s.tcpOpts)
		l4[12] = byte((tcpLen+len(s.tcpOpts))/4) << 4
		l4[13] = s.tcpFlags
		binary.BigEndian.PutUint16(l4[14:], 64240)
	case ProtoUDP:
		l4 = make([]byte, udpLen, udpLen+len(s.payload))
		binary.BigEndian.PutUint16(l4[0:], s.src.Port())
		binary.BigEndian.PutUint16(l4[2:], s.dst.Port())
		binary.BigEndian.PutUint16(l4[4:], uint16(udpLen+len(s.payload)))
	default:
		panic("proto")
	}
	l4 = append(l4, s.payload...)

	v4 := s.src.Addr().Is4()
	var l3 []byte
	if v4 {
		ihl := ipv4Len + len(s.options)
		l3 = make([]byte, ihl)
		l3[0] = 0x40 | byte(ihl/4)
		binary.BigEndian.PutUint16(l3[2:], uint16(ihl+len(l4)))
		binary.BigEndian.PutUint16(l3[4:], 0x1234)
		binary.BigEndian.PutUint16(l3[6:], s.fragOff)
		l3[8] = s.ttl
		l3[9] = byte(s.proto)
		src, dst := s.src.Addr().As4(), s.dst.Addr().As4()
		copy(l3[12:], src[:])
		copy(l3[16:], dst[:])
		copy(l3[20:], s.options)
		binary.BigEndian.PutUint16(l3[10:], ^fold(sum(l3)))
	} else {
		l3 = make([]byte, ipv6Len)
		binary.BigEndian.PutUint32(l3[0:], 6<<28|0x12345)
		binary.BigEndian.PutUint16(l3[4:], uint16(len(l4)))
		l3[6] = byte(s.proto)
		l3[7] = s.ttl
		src, dst := s.src.Addr().As16(), s.dst.Addr().As16()
		copy(l3[8:], src[:])
		copy(l3[24:], dst[:])
	}
	if !(s.proto == ProtoUDP && s.noCsum) {
		c := ^fold(pseudoSum(l3, len(l4)) + sum(l4))
		if c == 0 && s.proto == ProtoUDP {
			c = 0xffff
		}
		binary.BigEndian.PutUint16(l4[csumOffset(s.proto):], c)
	}

	eth := make([]byte, ethHdrLen, ethHdrLen+len(l3)+len(l4))
	copy(eth[0:], s.dstMAC)
	copy(eth[6:], s.srcMAC)
	if v4 {
		binary.BigEndian.PutUint16(eth[12:], 0x0800)
	} else {
		binary.BigEndian.PutUint16(eth[12:], 0x86dd)
	}
	return append(append(eth, l3...), l4...)
}

func csumOffset(p Proto) int {
	if p == ProtoTCP {
		return 16
	}
	return 6
}

// sum is the 32-bit one's complement accumulation of b as big-endian 16-bit words.
func sum(b []byte) uint32 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	return s
}

func fold(s uint32) uint16 {
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

// pseudoSum sums the pseudo-header of the IP header l3 for an L4 segment of l4len bytes.
func pseudoSum(l3 []byte, l4len int) uint32 {
	if l3[0]>>4 == 4 {
		return sum(l3[12:20]) + uint32(l3[9]) + uint32(l4len)
	}
	return sum(l3[8:40]) + uint32(l3[6]) + uint32(l4len)
}

// packet is a parsed packet.
type packet struct {
	srcMAC, dstMAC net.HardwareAddr
	src, dst       netip.AddrPort
	proto          Proto
	ttl            uint8
	tcpFlags       uint8
	payload        []byte
	l3, l4         []byte
}

func parsePacket(b []byte) (packet, error) {
	var p packet
	if len(b) < ethHdrLen {
		return p, fmt.Errorf("short ethernet frame")
	}
	p.dstMAC, p.srcMAC = net.HardwareAddr(b[0:6]), net.HardwareAddr(b[6:12])
	b = b[ethHdrLen:]
	var srcA, dstA netip.Addr
	switch {
	case len(b) >= ipv4Len && b[0]>>4 == 4:
		ihl := int(b[0]&0xf) * 4
		tot := int(binary.BigEndian.Uint16(b[2:]))
		if ihl < ipv4Len || tot < ihl || tot > len(b) {
			return p, fmt.Errorf("bad IPv4 lengths ihl %d tot %d len %d", ihl, tot, len(b))
		}
		p.l3, p.l4 = b[:ihl], b[ihl:tot]
		p.proto, p.ttl = Proto(b[9]), b[8]
		srcA, dstA = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20]))
	case len(b) >= ipv6Len && b[0]>>4 == 6:
		plen := int(binary.BigEndian.Uint16(b[4:]))
		if ipv6Len+plen > len(b) {
			return p, fmt.Errorf("bad IPv6 payload length %d", plen)
		}
		p.l3, p.l4 = b[:ipv6Len], b[ipv6Len:ipv6Len+plen]
		p.proto, p.ttl = Proto(b[6]), b[7]
		srcA, dstA = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40]))
	default:
		return p, fmt.Errorf("not IP")
	}
	hlen := udpLen
	if p.proto == ProtoTCP {
		hlen = tcpLen
	}
	if len(p.l4) < hlen {
		return p, fmt.Errorf("short L4 header")
	}
	if p.proto == ProtoTCP {
		p.tcpFlags = p.l4[13]
		hlen = int(p.l4[12]>>4) * 4
	}
	p.src = netip.AddrPortFrom(srcA, binary.BigEndian.Uint16(p.l4[0:]))
	p.dst = netip.AddrPortFrom(dstA, binary.BigEndian.Uint16(p.l4[2:]))
	p.payload = p.l4[hlen:]
	return p, nil
}

// checksumErrors verifies the IPv4 header checksum and the TCP/UDP checksum from scratch. A
// UDP checksum of 0 over IPv4 means "none" and is accepted only if allowNoCsum.
func checksumErrors(b []byte, allowNoCsum bool) (packet, []string) {
	p, err := parsePacket(b)
	if err != nil {
		return p, []string{fmt.Sprintf("parse: %v", err)}
	}
	var errs []string
	if p.l3[0]>>4 == 4 {
		if s := fold(sum(p.l3)); s != 0xffff {
			errs = append(errs, fmt.Sprintf("IPv4 header checksum wrong: header sums to %#04x, want 0xffff", s))
		}
	}
	field := binary.BigEndian.Uint16(p.l4[csumOffset(p.proto):])
	if p.proto == ProtoUDP && field == 0 && p.l3[0]>>4 == 4 {
		if !allowNoCsum {
			errs = append(errs, "UDP checksum is 0 (none)")
		}
		return p, errs
	}
	if s := fold(pseudoSum(p.l3, len(p.l4)) + sum(p.l4)); s != 0xffff {
		errs = append(errs, fmt.Sprintf("%s checksum wrong: segment and pseudo-header sum to %#04x, want 0xffff (field %#04x)",
			p.proto, s, field))
	}
	return p, errs
}

func checkChecksums(t *testing.T, b []byte, allowNoCsum bool) packet {
	t.Helper()
	p, errs := checksumErrors(b, allowNoCsum)
	for _, e := range errs {
		t.Errorf("%s\n%x", e, b)
	}
	return p
}

// completePartial does what a NIC does to a CHECKSUM_PARTIAL packet: the L4 checksum field
// holds the pseudo-header sum; the complement of the sum over the segment goes into it.
func completePartial(b []byte) ([]byte, error) {
	out := append([]byte(nil), b...)
	p, err := parsePacket(out)
	if err != nil {
		return nil, err
	}
	off := csumOffset(p.proto)
	c := ^fold(sum(p.l4))
	if c == 0 && p.proto == ProtoUDP {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(p.l4[off:], c)
	return out, nil
}

// flowHash is the reference of lb.c's flow_hash: MurmurHash3_x86_32 of the 40-byte flow key
// (client address and port, frontend address and port, protocol; addresses 16 bytes,
// IPv4-mapped, ports in network order, 3 zero bytes of padding).
func flowHash(client, frontend netip.AddrPort, proto Proto, seed uint32) uint32 {
	var k [40]byte
	s, d := client.Addr().As16(), frontend.Addr().As16()
	copy(k[0:], s[:])
	copy(k[16:], d[:])
	binary.BigEndian.PutUint16(k[32:], client.Port())
	binary.BigEndian.PutUint16(k[34:], frontend.Port())
	k[36] = byte(proto)
	return murmur3(k[:], seed)
}

// murmur3 is MurmurHash3_x86_32 of b, whose length is a multiple of 4 (no tail).
func murmur3(b []byte, seed uint32) uint32 {
	rotl := func(x uint32, r uint) uint32 { return x<<r | x>>(32-r) }
	h := seed
	for i := 0; i+4 <= len(b); i += 4 {
		x := binary.LittleEndian.Uint32(b[i:])
		x *= 0xcc9e2d51
		x = rotl(x, 15)
		x *= 0x1b873593
		h ^= x
		h = rotl(h, 13)
		h = h*5 + 0xe6546b64
	}
	h ^= uint32(len(b))
	h ^= h >> 16
	h *= 0x85ebca6b
	h ^= h >> 13
	h *= 0xc2b2ae35
	h ^= h >> 16
	return h
}

// The builder and the checker must agree with each other before they judge the datapath.
func TestPacketBuilder(t *testing.T) {
	specs := []pktSpec{
		{src: netip.MustParseAddrPort("198.18.0.100:40000"), dst: netip.MustParseAddrPort("198.18.0.11:30080"), proto: ProtoTCP, tcpFlags: tcpSYN},
		{src: netip.MustParseAddrPort("198.18.0.100:40000"), dst: netip.MustParseAddrPort("198.18.0.11:30080"), proto: ProtoTCP, payload: []byte("odd"), options: []byte{1, 1, 1, 0}},
		{src: netip.MustParseAddrPort("198.18.0.100:40000"), dst: netip.MustParseAddrPort("198.18.0.11:30053"), proto: ProtoUDP, payload: []byte("hello")},
		{src: netip.MustParseAddrPort("[fd6b:7072::100]:40000"), dst: netip.MustParseAddrPort("[fd6b:7072::11]:30080"), proto: ProtoTCP, payload: []byte("v6")},
		{src: netip.MustParseAddrPort("[fd6b:7072::100]:40000"), dst: netip.MustParseAddrPort("[fd6b:7072::11]:30053"), proto: ProtoUDP},
	}
	for _, s := range specs {
		b := buildPacket(s)
		p := checkChecksums(t, b, false)
		if p.src != s.src || p.dst != s.dst || p.proto != s.proto || string(p.payload) != string(s.payload) {
			t.Errorf("round trip of %+v: %+v", s, p)
		}
		// A corrupted byte must be noticed.
		b[len(b)-1] ^= 0x40
		if _, errs := checksumErrors(b, false); len(errs) == 0 {
			t.Errorf("corruption of %+v not noticed", s)
		}
	}
	// MurmurHash3_x86_32 test vectors (SMHasher's reference implementation).
	for _, v := range []struct {
		in   string
		seed uint32
		want uint32
	}{
		{"", 0, 0},
		{"", 1, 0x514e28b7},
		{"\x00\x00\x00\x00", 0, 0x2362f9de},
		{"\xff\xff\xff\xff", 0, 0x76293b50},
		{"aaaa", 0x9747b28c, 0x5a97808a},
	} {
		if got := murmur3([]byte(v.in), v.seed); got != v.want {
			t.Errorf("murmur3(%q, %#x) = %#x, want %#x", v.in, v.seed, got, v.want)
		}
	}
}
