// Package lbstate computes, from Service and EndpointSlice objects, the frontends kpr programs and
// the backends behind each of them. It is where kube-proxy's semantics live (traffic policies,
// terminating-endpoint fallback, topology hints, session affinity, short-circuiting of local
// traffic to external addresses, source ranges), as pure functions of their inputs, so they are
// tested as data without a kernel.
package lbstate

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	netutils "k8s.io/utils/net"
)

// Labels that keep a Service or EndpointSlice away from kpr, exactly as kube-proxy selects.
const (
	LabelServiceProxyName = "service.kubernetes.io/service-proxy-name"
	LabelHeadless         = v1.IsHeadlessService
)

// AnnotationForwardingMode on a Service overrides the node's forwarding mode (Options.Mode) for
// its north-south frontends: snat, dsr or hybrid.
const AnnotationForwardingMode = "kpr.dev/forwarding-mode"

// Mode is how north-south traffic reaches a backend on another node and how its replies return.
type Mode string

const (
	// ModeSNAT: the node that receives a flow translates its destination and source; the
	// backend answers that node, which translates back (kube-proxy's behaviour).
	ModeSNAT Mode = "snat"
	// ModeDSR: direct server return. The backend sees the client's address and its node
	// answers the client directly from the frontend (the frontend travels with the flow in an
	// IP option). Needs kpr on every node and pod addresses routed between the nodes unchanged.
	ModeDSR Mode = "dsr"
	// ModeHybrid: DSR for TCP, SNAT for UDP (where the option would cost every datagram 8 or
	// 24 bytes).
	ModeHybrid Mode = "hybrid"
)

func (m Mode) orSNAT() Mode {
	if m == "" {
		return ModeSNAT
	}
	return m
}

// ParseMode accepts the names of the modes.
func ParseMode(s string) (Mode, bool) {
	switch m := Mode(s); m {
	case ModeSNAT, ModeDSR, ModeHybrid:
		return m, true
	}
	return "", false
}

// dsr says whether m forwards a frontend of protocol p by DSR.
func (m Mode) dsr(p v1.Protocol) bool {
	return m == ModeDSR && (p == v1.ProtocolTCP || p == v1.ProtocolUDP) || m == ModeHybrid && p == v1.ProtocolTCP
}

// DefaultAffinityTimeoutSec is the Kubernetes default for sessionAffinity: ClientIP.
const DefaultAffinityTimeoutSec = 10800

// Scope says which lookups a frontend serves.
type Scope uint8

const (
	// ScopeSocket frontends are looked up by the socket-level load balancer, for connections
	// made by processes on this node (host and pods).
	ScopeSocket Scope = iota
	// ScopeExternal frontends are looked up by the tc/XDP programs for traffic arriving on the
	// node's interfaces.
	ScopeExternal
)

func (s Scope) String() string {
	if s == ScopeExternal {
		return "external"
	}
	return "socket"
}

// Type is the kind of Service address a frontend belongs to.
type Type uint8

const (
	ClusterIP Type = iota
	NodePort
	ExternalIP
	LoadBalancer
)

func (t Type) String() string {
	if t > LoadBalancer {
		return fmt.Sprintf("Type(%d)", uint8(t))
	}
	return [...]string{"ClusterIP", "NodePort", "ExternalIP", "LoadBalancer"}[t]
}

// OwnsAddress reports whether addresses of this type belong to Services alone, so that a port or
// protocol no frontend serves is refused (the datapath's per-address wildcard entry). Only
// ClusterIPs do, as in kube-proxy ("Reject traffic to invalid ports of ClusterIPs"). A NodePort
// address is the node's own address, and external and load-balancer IPs may be too (or be
// shared): traffic to their other ports is not the Services' and must pass untouched.
func (t Type) OwnsAddress() bool { return t == ClusterIP }

// Verdict says what happens to a connection to a frontend that has no backends to use.
type Verdict uint8

const (
	// Reject: the Service has no usable endpoint anywhere; the client is refused at once
	// (kube-proxy: REJECT).
	Reject Verdict = iota
	// Unreachable: the Service has endpoints, but none that this traffic may use under a Local
	// traffic policy (kube-proxy: DROP). kpr fails the connect with EHOSTUNREACH instead of
	// letting it time out; see docs/kube-proxy-differences.md.
	Unreachable
)

// ServicePortName identifies one port of one Service, as kube-proxy does.
type ServicePortName struct {
	Namespace, Name, Port string
	Protocol              v1.Protocol
}

func (n ServicePortName) String() string {
	if n.Port == "" {
		return n.Namespace + "/" + n.Name
	}
	return n.Namespace + "/" + n.Name + ":" + n.Port
}

// FrontendKey is what a lookup in the datapath matches: address, port, protocol and scope.
type FrontendKey struct {
	Addr     netip.Addr
	Port     uint16
	Protocol v1.Protocol
	Scope    Scope
}

func (k FrontendKey) String() string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(k.Addr, k.Port), strings.ToLower(string(k.Protocol)))
}

// Frontend is one address:port/protocol of a Service and the ordered backends behind it.
//
// Which backends, by scope and type (kube-proxy's semantics):
//   - ClusterIP, both scopes: the internal traffic policy's endpoints (local ones only under
//     internalTrafficPolicy Local).
//   - NodePort, ExternalIP and LoadBalancer, socket scope: every usable endpoint in the cluster,
//     whatever the external traffic policy. kube-proxy "short-circuits" traffic from pods and from
//     the node itself to these addresses to the Cluster policy, as if it had gone out to an
//     external load balancer and come back.
//   - NodePort, ExternalIP and LoadBalancer, external scope: the external traffic policy's
//     endpoints (local ones only under externalTrafficPolicy Local).
//
// Frontends of one Service may share their Backends and LoadBalancerSourceRanges slices; treat
// them as read-only.
type Frontend struct {
	FrontendKey
	Service  ServicePortName
	Type     Type
	Backends []netip.AddrPort // sorted, unique
	// NoBackends applies when Backends is empty.
	NoBackends         Verdict
	AffinityTimeoutSec uint32 // 0: no session affinity
	// PreserveClientIP: the backend must see the client's own address, so the datapath must not
	// SNAT. Always true in the socket scope: the socket LB connects the client's socket straight
	// to the backend and never masquerades (see docs/kube-proxy-differences.md). In the external
	// scope true only for NodePort, ExternalIP and LoadBalancer frontends under
	// externalTrafficPolicy Local; everything else is masqueraded, as kube-proxy does.
	PreserveClientIP bool
	// DSR, in the external scope only, forwards by direct server return (see ModeDSR): true for
	// NodePort, ExternalIP and LoadBalancer frontends whose Service's mode (the annotation, else
	// Options.Mode) sends their protocol by DSR, unless externalTrafficPolicy is Local (every
	// backend is then on this node and already sees the client's address).
	DSR bool
	// LoadBalancerSourceRanges, on LoadBalancer frontends only (both scopes), are the client
	// addresses allowed; empty allows every client. The datapath drops the others (kube-proxy:
	// DROP). They are spec.loadBalancerSourceRanges of the frontend's family (a /0 among them
	// allows all), plus every LoadBalancer IP of that family as a single address when one of the
	// node's NodePort addresses is allowed: a connection from the node to a load-balancer IP
	// bound on the node loops back with that IP as its source. ExternalIP frontends never
	// carry source ranges, NodePort frontends only in the external scope of a LoadBalancer
	// Service with Options.NodePortSourceRanges (kube-proxy: "nodePort bypasses
	// LoadBalancerSourceRanges").
	LoadBalancerSourceRanges []netip.Prefix
}

// Equal reports whether f and g are the same frontend with the same backends and settings.
func (f Frontend) Equal(g Frontend) bool {
	return f.FrontendKey == g.FrontendKey && f.Service == g.Service && f.Type == g.Type &&
		f.NoBackends == g.NoBackends && f.AffinityTimeoutSec == g.AffinityTimeoutSec &&
		f.PreserveClientIP == g.PreserveClientIP && f.DSR == g.DSR &&
		slices.Equal(f.Backends, g.Backends) &&
		slices.Equal(f.LoadBalancerSourceRanges, g.LoadBalancerSourceRanges)
}

// Node is what the computation needs to know about the node kpr runs on.
type Node struct {
	Name string
	Zone string // the node's topology.kubernetes.io/zone label, for topology hints
}

// Options are node-wide choices about which frontends kpr serves.
type Options struct {
	// ExternalClusterIP also serves each ClusterIP in the external scope, to packets that arrive
	// from off the node (kube-proxy serves those, masqueraded). Off by default: ClusterIPs are
	// for clients in the cluster, all of which the socket LB of their own node serves, and
	// routing a Service CIDR to a node is rare. See docs/kube-proxy-differences.md.
	ExternalClusterIP bool
	// NodePortSourceRanges also applies a LoadBalancer Service's loadBalancerSourceRanges to
	// its NodePorts in the external scope. Off by default, as in kube-proxy, where a NodePort
	// bypasses them: a client that may not use the load-balancer IP can still reach the
	// Service through any node's NodePort unless this is on.
	NodePortSourceRanges bool
	// Mode is the node's forwarding mode for north-south frontends; empty means ModeSNAT. A
	// Service's AnnotationForwardingMode overrides it.
	Mode Mode
}

// ServiceInfo is what kpr needs of one Service beyond its frontends.
type ServiceInfo struct {
	// HealthCheckNodePort is spec.healthCheckNodePort of a LoadBalancer Service with
	// externalTrafficPolicy Local, the port on which the node answers a load balancer's health
	// checks for that Service; 0 if the Service has none.
	HealthCheckNodePort uint16
	// LocalReadyEndpoints is the number of distinct addresses of ready endpoints on this node,
	// over every port, by IP family ([0] IPv4, [1] IPv6): what that health check reports
	// (healthy if not 0). kube-proxy runs a proxier, with its own health check server, per
	// family, so a check sent to an IPv4 address of the node reports the IPv4 count.
	LocalReadyEndpoints [2]int
}

// Problem is a part of a Service that kpr skips, naming the field; the rest is served.
type Problem struct {
	Field  string // e.g. "spec.externalIPs[1]"
	Detail string
}

func (p Problem) String() string { return p.Field + ": " + p.Detail }

// Endpoint is one backend address of a Service port, with the conditions kube-proxy uses.
type Endpoint struct {
	AddrPort                    netip.AddrPort
	Ready, Serving, Terminating bool
	Local                       bool
	ZoneHints, NodeHints        []string
}

// Ignored says why kpr does not serve a Service, or "" if it does.
func Ignored(svc *v1.Service) string {
	if _, ok := svc.Labels[LabelServiceProxyName]; ok {
		return "label " + LabelServiceProxyName + " names another proxy"
	}
	if svc.Spec.Type == v1.ServiceTypeExternalName {
		return "type ExternalName"
	}
	if svc.Spec.ClusterIP == v1.ClusterIPNone || svc.Spec.ClusterIP == "" {
		return "headless (clusterIP: None)"
	}
	return ""
}

// ServiceEndpoints merges the EndpointSlices of one Service into endpoints per Service port,
// keyed by port name and protocol. Duplicates across slices collapse into one, preferring a
// non-terminating copy, as kube-proxy's EndpointSliceCache does.
func ServiceEndpoints(epSlices []*discovery.EndpointSlice, node string) map[ServicePortName][]Endpoint {
	byPort := map[ServicePortName]map[netip.AddrPort]Endpoint{}
	for _, s := range epSlices {
		if s.AddressType != discovery.AddressTypeIPv4 && s.AddressType != discovery.AddressTypeIPv6 {
			continue
		}
		for _, p := range s.Ports {
			if p.Name == nil || p.Port == nil || *p.Port <= 0 || *p.Port > 65535 {
				continue
			}
			proto := v1.ProtocolTCP
			if p.Protocol != nil {
				proto = *p.Protocol
			}
			spn := ServicePortName{Namespace: s.Namespace, Name: s.Labels[discovery.LabelServiceName], Port: *p.Name, Protocol: proto}
			set := byPort[spn]
			if set == nil {
				set = map[netip.AddrPort]Endpoint{}
				byPort[spn] = set
			}
			for i := range s.Endpoints {
				ep := &s.Endpoints[i]
				if len(ep.Addresses) == 0 {
					continue
				}
				addr, ok := parseIP(ep.Addresses[0])
				if !ok {
					continue
				}
				e := Endpoint{
					AddrPort:    netip.AddrPortFrom(addr, uint16(*p.Port)),
					Ready:       ep.Conditions.Ready == nil || *ep.Conditions.Ready,
					Serving:     ep.Conditions.Serving == nil || *ep.Conditions.Serving,
					Terminating: ep.Conditions.Terminating != nil && *ep.Conditions.Terminating,
					Local:       node != "" && ep.NodeName != nil && *ep.NodeName == node,
				}
				if ep.Hints != nil {
					for _, z := range ep.Hints.ForZones {
						e.ZoneHints = append(e.ZoneHints, z.Name)
					}
					for _, n := range ep.Hints.ForNodes {
						e.NodeHints = append(e.NodeHints, n.Name)
					}
				}
				if _, exists := set[e.AddrPort]; !exists || !e.Terminating {
					set[e.AddrPort] = e
				}
			}
		}
	}
	out := make(map[ServicePortName][]Endpoint, len(byPort))
	for spn, set := range byPort {
		eps := make([]Endpoint, 0, len(set))
		for _, e := range set {
			eps = append(eps, e)
		}
		slices.SortFunc(eps, func(a, b Endpoint) int { return a.AddrPort.Compare(b.AddrPort) })
		out[spn] = eps
	}
	return out
}

// Categories are the endpoint sets kube-proxy derives for one Service port on one node.
type Categories struct {
	Cluster []Endpoint // for traffic under a Cluster policy
	Local   []Endpoint // for traffic under a Local policy
	// Any is true if the Service has a usable endpoint on any node: it separates "refuse"
	// (no endpoints at all) from "drop" (endpoints exist, but not locally).
	Any bool
}

// Categorize splits endpoints as kube-proxy's CategorizeEndpoints does: ready endpoints (within
// the topology hints that apply to this node), falling back to serving-and-terminating ones
// when none is ready, for the cluster set and, separately, for the local set.
func Categorize(eps []Endpoint, node Node) Categories {
	var c Categories
	mode := topologyMode(eps, node)
	for _, e := range eps {
		if e.Ready && availableForTopology(e, mode, node) {
			c.Cluster = append(c.Cluster, e)
		}
	}
	if len(c.Cluster) == 0 {
		c.Cluster = filter(eps, func(e Endpoint) bool { return e.Serving && e.Terminating })
	}
	var localReady, localTerminating bool
	for _, e := range eps {
		switch {
		case e.Ready:
			c.Any = true
			localReady = localReady || e.Local
		case e.Serving && e.Terminating:
			c.Any = true
			localTerminating = localTerminating || e.Local
		}
	}
	if len(c.Cluster) > 0 {
		c.Any = true
	}
	switch {
	case localReady:
		c.Local = filter(eps, func(e Endpoint) bool { return e.Local && e.Ready })
	case localTerminating:
		c.Local = filter(eps, func(e Endpoint) bool { return e.Local && e.Serving && e.Terminating })
	}
	return c
}

const (
	topologyNone     = ""
	topologySameNode = v1.ServiceTrafficDistributionPreferSameNode
	topologySameZone = v1.ServiceTrafficDistributionPreferSameZone
)

// topologyMode applies hints only when every ready endpoint carries them and one of them is
// for this node (or zone); otherwise hints are ignored, as in kube-proxy.
func topologyMode(eps []Endpoint, node Node) string {
	var anyReady, forNode, forZone bool
	allNode, allZone := true, true
	for _, e := range eps {
		if !e.Ready {
			continue
		}
		anyReady = true
		if len(e.NodeHints) == 0 {
			allNode = false
		} else if slices.Contains(e.NodeHints, node.Name) {
			forNode = true
		}
		if len(e.ZoneHints) == 0 {
			allZone = false
		} else if slices.Contains(e.ZoneHints, node.Zone) {
			forZone = true
		}
	}
	switch {
	case !anyReady:
		return topologyNone
	case allNode && forNode:
		return topologySameNode
	case allZone && forZone:
		return topologySameZone
	}
	return topologyNone
}

func availableForTopology(e Endpoint, mode string, node Node) bool {
	switch mode {
	case topologySameNode:
		return slices.Contains(e.NodeHints, node.Name)
	case topologySameZone:
		return slices.Contains(e.ZoneHints, node.Zone)
	}
	return true
}

func filter(eps []Endpoint, keep func(Endpoint) bool) []Endpoint {
	var out []Endpoint
	for _, e := range eps {
		if keep(e) {
			out = append(out, e)
		}
	}
	return out
}

// Frontends returns the socket-scope ClusterIP frontends of one Service: each ClusterIP (every
// family the Service has) times each port, with the backends of the same family that local
// clients may use under the internal traffic policy. endpoints comes from ServiceEndpoints.
// AllFrontends has the rest.
func Frontends(svc *v1.Service, endpoints map[ServicePortName][]Endpoint, node Node) []Frontend {
	_, all, _ := AllFrontends(svc, endpoints, node, nil, Options{})
	out := all[:0]
	for _, f := range all {
		if f.Scope == ScopeSocket && f.Type == ClusterIP {
			out = append(out, f)
		}
	}
	return slices.Clip(out)
}

// AllFrontends returns every frontend kube-proxy would serve for one Service on one node, in
// both scopes, sorted by key; the Service-level data (health check); and the problems found in
// the Service, whose parts are skipped while the rest is served. endpoints comes from
// ServiceEndpoints; nodePortAddrs are the node's addresses that NodePorts are served on (chosen
// from nodePortAddresses by the caller), of either family.
//
// Per family of the Service's ClusterIPs, and per port:
//   - ClusterIP: socket scope; external scope too with opts.ExternalClusterIP.
//   - LoadBalancer: each status.loadBalancer.ingress IP of the family (ipMode Proxy skipped:
//     the load balancer proxies to the nodes, it does not deliver the VIP), both scopes.
//   - ExternalIP: each spec.externalIPs entry of the family, both scopes.
//   - NodePort: if the port has one, on each NodePort address of the family, both scopes (a
//     local socket connecting to its own node's NodePort is served by the socket LB).
//
// Addresses of a family the Service has no ClusterIP of are ignored, as by kube-proxy (its
// per-family proxier does not see the Service). If two of these give the same key, the first
// in the order above (then in the order of the Service's fields) wins and the other is
// reported.
func AllFrontends(svc *v1.Service, endpoints map[ServicePortName][]Endpoint, node Node, nodePortAddrs []netip.Addr, opts Options) (ServiceInfo, []Frontend, []Problem) {
	if Ignored(svc) != "" {
		return ServiceInfo{}, nil, nil
	}
	var problems []Problem
	report := func(field, format string, args ...any) {
		problems = append(problems, Problem{Field: field, Detail: fmt.Sprintf(format, args...)})
	}

	info := ServiceInfo{LocalReadyEndpoints: localReadyEndpoints(endpoints)}
	if needsHealthCheck(svc) {
		if p := svc.Spec.HealthCheckNodePort; p > 0 && p <= 65535 {
			info.HealthCheckNodePort = uint16(p)
		} else {
			report("spec.healthCheckNodePort", "%d is not a port; a LoadBalancer Service with externalTrafficPolicy Local needs one", p)
		}
	}

	internalLocal := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == v1.ServiceInternalTrafficPolicyLocal
	externalLocal := externalPolicyLocal(svc)
	var affinity uint32
	if svc.Spec.SessionAffinity == v1.ServiceAffinityClientIP {
		affinity = DefaultAffinityTimeoutSec
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			affinity = uint32(*c.ClientIP.TimeoutSeconds)
		}
	}

	// The addresses, each with the field it comes from.
	clusterIPs := clusterIPsByFamily(svc, report)
	externalIPs := parseAddrList(svc.Spec.ExternalIPs, "spec.externalIPs", report)
	var lbIPs []fieldAddr
	for i, ing := range svc.Status.LoadBalancer.Ingress {
		if ing.IP == "" || (ing.IPMode != nil && *ing.IPMode == v1.LoadBalancerIPModeProxy) {
			continue
		}
		field := fmt.Sprintf("status.loadBalancer.ingress[%d].ip", i)
		if a, ok := parseIP(ing.IP); ok {
			lbIPs = append(lbIPs, fieldAddr{a, field})
		} else {
			report(field, "%q is not an IP address", ing.IP)
		}
	}
	var nodeAddrs []netip.Addr
	for _, a := range nodePortAddrs {
		if a = a.Unmap(); a.IsValid() && a.Zone() == "" && !slices.Contains(nodeAddrs, a) {
			nodeAddrs = append(nodeAddrs, a)
		}
	}
	ranges := sourceRanges(svc, report)
	mode := opts.Mode
	if v, ok := svc.Annotations[AnnotationForwardingMode]; ok {
		if m, ok := ParseMode(v); ok {
			mode = m
		} else {
			report("metadata.annotations["+AnnotationForwardingMode+"]", "%q is not snat, dsr or hybrid; the node's mode (%s) applies", v, mode.orSNAT())
		}
	}

	var cands []candidate
	for fi, vip := range clusterIPs {
		is4 := vip.addr.Is4()
		fam := func(a netip.Addr) bool { return a.Is4() == is4 }
		famLB := filterAddrs(lbIPs, fam)
		famExt := filterAddrs(externalIPs, fam)
		famNode := slices.DeleteFunc(slices.Clone(nodeAddrs), func(a netip.Addr) bool { return !fam(a) })
		famRanges := ranges.of(is4, famLB, famNode)
		var npRanges []netip.Prefix
		if opts.NodePortSourceRanges && svc.Spec.Type == v1.ServiceTypeLoadBalancer {
			npRanges = ranges.nodePort(is4)
		}

		for i, p := range svc.Spec.Ports {
			portField := fmt.Sprintf("spec.ports[%d]", i)
			if p.Port <= 0 || p.Port > 65535 {
				if fi == 0 { // once, not per family
					report(portField+".port", "%d is not a port", p.Port)
				}
				continue
			}
			proto := p.Protocol
			if proto == "" {
				proto = v1.ProtocolTCP
			}
			spn := ServicePortName{Namespace: svc.Namespace, Name: svc.Name, Port: p.Name, Protocol: proto}
			var family []Endpoint
			for _, e := range endpoints[spn] {
				if e.AddrPort.Addr().Is4() == is4 {
					family = append(family, e)
				}
			}
			cat := Categorize(family, node)
			clusterBE := addrPorts(cat.Cluster)
			internalBE, externalBE := clusterBE, clusterBE
			if internalLocal {
				internalBE = addrPorts(cat.Local)
			}
			if externalLocal {
				externalBE = addrPorts(cat.Local)
			}

			add := func(addr netip.Addr, port uint16, typ Type, field string) {
				fe := Frontend{
					FrontendKey:        FrontendKey{Addr: addr, Port: port, Protocol: proto, Scope: ScopeSocket},
					Service:            spn,
					Type:               typ,
					AffinityTimeoutSec: affinity,
					PreserveClientIP:   true,
				}
				if typ == LoadBalancer {
					fe.LoadBalancerSourceRanges = famRanges
				}
				sock, ext := fe, fe
				ext.Scope = ScopeExternal
				if typ == NodePort {
					ext.LoadBalancerSourceRanges = npRanges
				}
				if typ == ClusterIP {
					sock.Backends, ext.Backends = internalBE, internalBE
					ext.PreserveClientIP = false
				} else {
					sock.Backends, ext.Backends = clusterBE, externalBE
					ext.PreserveClientIP = externalLocal
					ext.DSR = !externalLocal && mode.dsr(proto)
				}
				sock.NoBackends, ext.NoBackends = noBackends(sock.Backends, cat.Any), noBackends(ext.Backends, cat.Any)
				cands = append(cands, candidate{sock, field})
				if typ != ClusterIP || opts.ExternalClusterIP {
					cands = append(cands, candidate{ext, field})
				}
			}

			add(vip.addr, uint16(p.Port), ClusterIP, vip.field)
			for _, a := range famLB {
				add(a.addr, uint16(p.Port), LoadBalancer, a.field)
			}
			for _, a := range famExt {
				add(a.addr, uint16(p.Port), ExternalIP, a.field)
			}
			switch {
			case p.NodePort == 0:
			case p.NodePort < 0 || p.NodePort > 65535:
				if fi == 0 {
					report(portField+".nodePort", "%d is not a port", p.NodePort)
				}
			default:
				for _, a := range famNode {
					add(a, uint16(p.NodePort), NodePort, portField+".nodePort")
				}
			}
		}
	}

	// A stable sort keeps the candidates of one key in the order they were made: the first wins.
	slices.SortStableFunc(cands, func(a, b candidate) int { return CompareKeys(a.fe.FrontendKey, b.fe.FrontendKey) })
	out := make([]Frontend, 0, len(cands))
	var kept candidate
	for _, c := range cands {
		if len(out) > 0 && kept.fe.FrontendKey == c.fe.FrontendKey {
			// Each address yields a candidate per scope: report a clash once, for the socket
			// scope (in key order).
			if c.fe.Scope == ScopeSocket {
				report(c.field, "%s %s is already served as %s (%s)", c.fe.Type, c.fe.FrontendKey, kept.fe.Type, kept.field)
			}
			continue
		}
		kept = c
		out = append(out, c.fe)
	}
	return info, slices.Clip(out), problems
}

// candidate is a frontend before duplicate keys are removed, with the field it comes from.
type candidate struct {
	fe    Frontend
	field string
}

type fieldAddr struct {
	addr  netip.Addr
	field string
}

func filterAddrs(as []fieldAddr, keep func(netip.Addr) bool) []fieldAddr {
	var out []fieldAddr
	for _, a := range as {
		if keep(a.addr) {
			out = append(out, a)
		}
	}
	return out
}

func addrPorts(eps []Endpoint) []netip.AddrPort {
	if len(eps) == 0 {
		return nil
	}
	out := make([]netip.AddrPort, len(eps))
	for i, e := range eps {
		out[i] = e.AddrPort
	}
	return out
}

func noBackends(backends []netip.AddrPort, anyEndpoint bool) Verdict {
	if len(backends) == 0 && anyEndpoint {
		return Unreachable
	}
	return Reject
}

// parseIP parses an IP address as kube-proxy does: leading zeros in IPv4 are accepted (and
// read as decimal), for objects stored before the API server rejected them. IPv4-mapped IPv6
// addresses become IPv4; zones are refused.
func parseIP(s string) (netip.Addr, bool) {
	if a, err := netip.ParseAddr(s); err == nil {
		return a.Unmap(), a.Zone() == ""
	}
	if ip := netutils.ParseIPSloppy(s); ip != nil {
		a, ok := netip.AddrFromSlice(ip)
		return a.Unmap(), ok
	}
	return netip.Addr{}, false
}

// parsePrefix is parseIP for CIDRs; the result is masked, as kube-proxy's.
func parsePrefix(s string) (netip.Prefix, bool) {
	if p, err := netip.ParsePrefix(s); err == nil {
		if p.Addr().Is4In6() {
			return netip.Prefix{}, false // ambiguous bits; the API server refuses these too
		}
		return p.Masked(), p.Addr().Zone() == ""
	}
	if _, n, err := netutils.ParseCIDRSloppy(s); err == nil {
		a, ok := netip.AddrFromSlice(n.IP)
		bits, _ := n.Mask.Size()
		if !ok {
			return netip.Prefix{}, false
		}
		a = a.Unmap()
		return netip.PrefixFrom(a, bits).Masked(), bits <= a.BitLen()
	}
	return netip.Prefix{}, false
}

// parseAddrList parses a list of IP addresses, reporting bad entries. Empty entries are skipped
// silently, as kube-proxy does (the API server has not always refused them).
func parseAddrList(list []string, field string, report func(field, format string, args ...any)) []fieldAddr {
	var out []fieldAddr
	for i, s := range list {
		if strings.TrimSpace(s) == "" {
			continue
		}
		f := fmt.Sprintf("%s[%d]", field, i)
		if a, ok := parseIP(s); ok {
			out = append(out, fieldAddr{a, f})
		} else {
			report(f, "%q is not an IP address", s)
		}
	}
	return out
}

// clusterIPsByFamily returns the Service's ClusterIPs, the first of each family, primary
// family first.
func clusterIPsByFamily(svc *v1.Service, report func(field, format string, args ...any)) []fieldAddr {
	var out []fieldAddr
	if len(svc.Spec.ClusterIPs) == 0 {
		out = parseAddrList([]string{svc.Spec.ClusterIP}, "spec.clusterIP", report)
		for i := range out {
			out[i].field = "spec.clusterIP"
		}
		return out
	}
	for _, a := range parseAddrList(svc.Spec.ClusterIPs, "spec.clusterIPs", report) {
		if slices.ContainsFunc(out, func(b fieldAddr) bool { return b.addr.Is4() == a.addr.Is4() }) {
			report(a.field, "a second ClusterIP of the same family is ignored")
			continue
		}
		out = append(out, a)
	}
	return out
}

// parsedRanges are spec.loadBalancerSourceRanges by family; a /0 empties its family's list.
type parsedRanges struct {
	v4, v6               []netip.Prefix
	allowAll4, allowAll6 bool
}

func sourceRanges(svc *v1.Service, report func(field, format string, args ...any)) parsedRanges {
	var r parsedRanges
	for i, s := range svc.Spec.LoadBalancerSourceRanges {
		// The API server has accepted blanks around a range; kube-proxy trims them.
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		p, ok := parsePrefix(s)
		if !ok {
			report(fmt.Sprintf("spec.loadBalancerSourceRanges[%d]", i), "%q is not a CIDR", s)
			continue
		}
		if p.Addr().Is4() {
			r.v4 = append(r.v4, p)
			r.allowAll4 = r.allowAll4 || p.Bits() == 0
		} else {
			r.v6 = append(r.v6, p)
			r.allowAll6 = r.allowAll6 || p.Bits() == 0
		}
	}
	return r
}

// of returns the source ranges of one family's LoadBalancer frontends (see
// Frontend.LoadBalancerSourceRanges), shared by all of them.
// nodePort is the family's ranges as a NodePort applies them (Options.NodePortSourceRanges):
// the Service's own, whether or not it has a load-balancer IP of that family yet.
func (r parsedRanges) nodePort(is4 bool) []netip.Prefix {
	return slices.Clip(slices.Clone(r.family(is4)))
}

// family is the ranges of one IP family; nil when they allow every client of it.
func (r parsedRanges) family(is4 bool) []netip.Prefix {
	if is4 {
		if r.allowAll4 {
			return nil
		}
		return r.v4
	}
	if r.allowAll6 {
		return nil
	}
	return r.v6
}

func (r parsedRanges) of(is4 bool, lbIPs []fieldAddr, nodeAddrs []netip.Addr) []netip.Prefix {
	ranges := r.family(is4)
	if len(ranges) == 0 || len(lbIPs) == 0 {
		return nil
	}
	out := slices.Clone(ranges)
	nodeAllowed := slices.ContainsFunc(nodeAddrs, func(a netip.Addr) bool {
		return slices.ContainsFunc(ranges, func(p netip.Prefix) bool { return p.Contains(a) })
	})
	if nodeAllowed {
		for _, a := range lbIPs {
			if p := netip.PrefixFrom(a.addr, a.addr.BitLen()); !slices.Contains(out, p) {
				out = append(out, p)
			}
		}
	}
	return slices.Clip(out)
}

// externallyAccessible and externalPolicyLocal are kube-proxy's (pkg/api/v1/service); a type
// left empty is the API default, ClusterIP.
func externallyAccessible(svc *v1.Service) bool {
	switch svc.Spec.Type {
	case v1.ServiceTypeLoadBalancer, v1.ServiceTypeNodePort:
		return true
	case v1.ServiceTypeClusterIP, "":
		return len(svc.Spec.ExternalIPs) > 0
	}
	return false
}

func externalPolicyLocal(svc *v1.Service) bool {
	return externallyAccessible(svc) && svc.Spec.ExternalTrafficPolicy == v1.ServiceExternalTrafficPolicyLocal
}

func needsHealthCheck(svc *v1.Service) bool {
	return svc.Spec.Type == v1.ServiceTypeLoadBalancer && externalPolicyLocal(svc)
}

// localReadyEndpoints counts distinct addresses per family, as kube-proxy does: an endpoint
// serving two ports is one.
func localReadyEndpoints(endpoints map[ServicePortName][]Endpoint) [2]int {
	seen := map[netip.Addr]bool{}
	var n [2]int
	for _, eps := range endpoints {
		for _, e := range eps {
			if a := e.AddrPort.Addr(); e.Ready && e.Local && !seen[a] {
				seen[a] = true
				if a.Is4() {
					n[0]++
				} else {
					n[1]++
				}
			}
		}
	}
	return n
}

// CompareKeys orders frontend keys, for stable output.
func CompareKeys(a, b FrontendKey) int {
	return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(a.Port, b.Port), cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Scope, b.Scope))
}
