// Package lbstate computes, from Service and EndpointSlice objects, the frontends kpr programs and
// the backends behind each of them. It is where kube-proxy's semantics live (traffic policies,
// terminating-endpoint fallback, topology hints, session affinity), as pure functions of their
// inputs, so they are tested as data without a kernel.
package lbstate

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
)

// Labels that keep a Service or EndpointSlice away from kpr, exactly as kube-proxy selects.
const (
	LabelServiceProxyName = "service.kubernetes.io/service-proxy-name"
	LabelHeadless         = v1.IsHeadlessService
)

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
type Frontend struct {
	FrontendKey
	Service  ServicePortName
	Type     Type
	Backends []netip.AddrPort // sorted, unique
	// NoBackends applies when Backends is empty.
	NoBackends         Verdict
	AffinityTimeoutSec uint32 // 0: no session affinity
}

// Node is what the computation needs to know about the node kpr runs on.
type Node struct {
	Name string
	Zone string // the node's topology.kubernetes.io/zone label, for topology hints
}

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
				addr, err := netip.ParseAddr(ep.Addresses[0])
				if err != nil {
					continue
				}
				e := Endpoint{
					AddrPort:    netip.AddrPortFrom(addr.Unmap(), uint16(*p.Port)),
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

// Frontends returns the socket-scope frontends of one Service: each ClusterIP (every family
// the Service has) times each port, with the backends of the same family that local clients
// may use under the internal traffic policy. endpoints comes from ServiceEndpoints.
func Frontends(svc *v1.Service, endpoints map[ServicePortName][]Endpoint, node Node) []Frontend {
	if Ignored(svc) != "" {
		return nil
	}
	internalLocal := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == v1.ServiceInternalTrafficPolicyLocal
	var affinity uint32
	if svc.Spec.SessionAffinity == v1.ServiceAffinityClientIP {
		affinity = DefaultAffinityTimeoutSec
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			affinity = uint32(*c.ClientIP.TimeoutSeconds)
		}
	}
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 {
		ips = []string{svc.Spec.ClusterIP}
	}
	var out []Frontend
	for _, ipStr := range ips {
		vip, err := netip.ParseAddr(ipStr)
		if err != nil {
			continue
		}
		vip = vip.Unmap()
		for _, p := range svc.Spec.Ports {
			proto := p.Protocol
			if proto == "" {
				proto = v1.ProtocolTCP
			}
			spn := ServicePortName{Namespace: svc.Namespace, Name: svc.Name, Port: p.Name, Protocol: proto}
			var family []Endpoint
			for _, e := range endpoints[spn] {
				if e.AddrPort.Addr().Is4() == vip.Is4() {
					family = append(family, e)
				}
			}
			cat := Categorize(family, node)
			use := cat.Cluster
			if internalLocal {
				use = cat.Local
			}
			fe := Frontend{
				FrontendKey:        FrontendKey{Addr: vip, Port: uint16(p.Port), Protocol: proto, Scope: ScopeSocket},
				Service:            spn,
				Type:               ClusterIP,
				AffinityTimeoutSec: affinity,
			}
			for _, e := range use {
				fe.Backends = append(fe.Backends, e.AddrPort)
			}
			if len(fe.Backends) == 0 && cat.Any {
				fe.NoBackends = Unreachable
			}
			out = append(out, fe)
		}
	}
	slices.SortFunc(out, func(a, b Frontend) int { return CompareKeys(a.FrontendKey, b.FrontendKey) })
	return out
}

// CompareKeys orders frontend keys, for stable output.
func CompareKeys(a, b FrontendKey) int {
	return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(a.Port, b.Port), cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Scope, b.Scope))
}
