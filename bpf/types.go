package bpf

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Proto is an IP protocol number (IPPROTO_*), as stored in the maps.
type Proto uint8

// Protocols a Service frontend or backend can use.
const (
	ProtoTCP  Proto = 6
	ProtoUDP  Proto = 17
	ProtoSCTP Proto = 132
	// ICMP and ICMPv6 appear only in echo markers (EchoMarker).
	ProtoICMP   Proto = 1
	ProtoICMPv6 Proto = 58
)

func (p Proto) String() string {
	switch p {
	case 0:
		return "ANY"
	case ProtoTCP:
		return "TCP"
	case ProtoUDP:
		return "UDP"
	case ProtoSCTP:
		return "SCTP"
	case ProtoICMP:
		return "ICMP"
	case ProtoICMPv6:
		return "ICMPv6"
	}
	return fmt.Sprintf("proto(%d)", uint8(p))
}

// Scope says which datapath a frontend belongs to.
type Scope uint8

const (
	// ScopeSocket frontends are translated by the cgroup socket hooks, for
	// traffic from local sockets.
	ScopeSocket Scope = 0
	// ScopeExternal frontends are for traffic entering the node (tc/XDP).
	ScopeExternal Scope = 1
)

// ServiceFlags are the flags of a frontend (slot 0).
type ServiceFlags uint16

// FlagUnreachable makes a frontend without backends fail with EHOSTUNREACH
// instead of ECONNREFUSED: endpoints exist, but none is usable under a Local
// traffic policy. Mirrors SVC_F_UNREACHABLE in sock.c.
const FlagUnreachable ServiceFlags = 1

// FlagPreserveClientIP, on an external-scope frontend, makes tc_nodeport translate only the
// destination: the backend sees the client's own address and port, and its reply, routed
// back through this node, is translated back by tc_nodeport_reply on the backend's device
// (externalTrafficPolicy Local, where every backend is local). Mirrors SVC_F_PRESERVE_SRC.
const FlagPreserveClientIP ServiceFlags = 2

// FlagSourceRanges, on an external-scope frontend, makes tc_nodeport serve only clients
// inside one of the frontend's source ranges (NodePortMaps.AddSourceRange): a LoadBalancer's
// spec.loadBalancerSourceRanges. Mirrors SVC_F_SRC_RANGES.
const FlagSourceRanges ServiceFlags = 4

// FlagDSR, on an external-scope frontend, makes tc_nodeport forward new flows by direct server
// return: the backend sees the client's address and the frontend travels to the backend's node
// in an IPv4 option or IPv6 destination option, whose kpr answers the client directly. Mirrors
// SVC_F_DSR.
const FlagDSR ServiceFlags = 8

// Bits 8..11 of the flags carry the frontend's Service type for listings (`kpr service
// list`); the datapath does not read them.
const (
	flagTypeShift = 8
	flagTypeMask  = 0xf << flagTypeShift
)

// WithType returns f carrying type t (a small number chosen by the caller).
func (f ServiceFlags) WithType(t uint8) ServiceFlags {
	return f&^flagTypeMask | ServiceFlags(t&0xf)<<flagTypeShift
}

// Type returns the type stored by WithType.
func (f ServiceFlags) Type() uint8 { return uint8((f & flagTypeMask) >> flagTypeShift) }

// ServiceKey identifies a frontend. Port 0 with Proto 0 is the wildcard
// entry that marks Addr as a VIP, so that ports it does not serve are refused
// instead of leaking out of the node. IPv4 addresses are stored IPv4-mapped;
// dumps return them unmapped.
type ServiceKey struct {
	Addr  netip.Addr
	Port  uint16
	Proto Proto
	Scope Scope
}

// Wildcard reports whether k is the wildcard entry of its address.
func (k ServiceKey) Wildcard() bool { return k.Port == 0 && k.Proto == 0 }

// Marker reports whether k marks its address rather than being a frontend: the wildcard
// entry, or an echo marker. A marker has no backends and no reverse NAT entry.
func (k ServiceKey) Marker() bool { return k.Port == 0 }

// EchoMarker is the entry that makes tc_nodeport answer ping to addr (external scope): an
// external or load-balancer IP with at least one endpoint.
func EchoMarker(addr netip.Addr) ServiceKey {
	p := ProtoICMPv6
	if addr.Is4() {
		p = ProtoICMP
	}
	return ServiceKey{Addr: addr, Proto: p, Scope: ScopeExternal}
}

func (k ServiceKey) String() string {
	if k.Wildcard() {
		return fmt.Sprintf("%s/* scope %d", k.Addr, k.Scope)
	}
	if k.Marker() {
		return fmt.Sprintf("%s/%s scope %d", k.Addr, k.Proto, k.Scope)
	}
	return fmt.Sprintf("%s/%s scope %d", netip.AddrPortFrom(k.Addr, k.Port), k.Proto, k.Scope)
}

// Service is a frontend's slot 0 plus its backend slots.
type Service struct {
	// ID is the svc_id, also the key of the frontend's reverse NAT entry.
	ID                 uint32
	Flags              ServiceFlags
	AffinityTimeoutSec uint32
	// Backends are backend IDs in slot order (slot 1 first). A slot that is
	// missing from the map (only during a concurrent update) dumps as 0.
	Backends []uint32
}

// Backend is an endpoint a frontend translates to.
type Backend struct {
	Addr  netip.Addr
	Port  uint16
	Proto Proto
}

// RevNat is the frontend address that replies are translated back to.
type RevNat struct {
	Addr netip.Addr
	Port uint16
}

// AffinityMatch is a (svc_id, backend_id) pair that session affinity may keep using.
type AffinityMatch struct {
	SvcID, BackendID uint32
}

// maxSlots is the largest backend count a frontend can carry (count is u16).
const maxSlots = 1<<16 - 1

func (k ServiceKey) validate() error {
	if err := validAddr(k.Addr); err != nil {
		return fmt.Errorf("service %s: %w", k, err)
	}
	if k.Scope > ScopeExternal {
		return fmt.Errorf("service %s: unknown scope %d", k, k.Scope)
	}
	echo := k.Port == 0 && k.Scope == ScopeExternal &&
		(k.Proto == ProtoICMP && k.Addr.Is4() || k.Proto == ProtoICMPv6 && k.Addr.Is6())
	if (k.Port == 0) != (k.Proto == 0) && !echo {
		return fmt.Errorf("service %s: port and protocol must both be set, or both be 0 for the wildcard entry (or ICMP/ICMPv6 of the address's family for an external echo marker)", k)
	}
	return nil
}

func validAddr(a netip.Addr) error {
	if !a.IsValid() {
		return fmt.Errorf("invalid address")
	}
	if a.Zone() != "" {
		return fmt.Errorf("address %s has a zone, which the maps cannot hold", a)
	}
	return nil
}

// netPort converts a host-order port to the network-order value the C side
// reads as __be16.
func netPort(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

// hostPort is the inverse of netPort.
func hostPort(p uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], p)
	return binary.BigEndian.Uint16(b[:])
}

func svcKey(k ServiceKey, slot uint16) sockSvcKey {
	return sockSvcKey{
		Addr:  k.Addr.As16(),
		Port:  netPort(k.Port),
		Proto: uint8(k.Proto),
		Scope: uint8(k.Scope),
		Slot:  slot,
	}
}

func serviceKeyFrom(k *sockSvcKey) ServiceKey {
	return ServiceKey{
		Addr:  netip.AddrFrom16(k.Addr).Unmap(),
		Port:  hostPort(k.Port),
		Proto: Proto(k.Proto),
		Scope: Scope(k.Scope),
	}
}
