package lbstate

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Object builders shared by the tests of this package. They build the API objects the way the
// API server would hand them to kpr (EndpointSlices carry the kubernetes.io/service-name label).

func ptrTo[T any](v T) *T { return &v }

// service returns a Service ns/name with the given ClusterIP and ports; mutate, if not nil,
// sets the rest.
func service(ns, name, clusterIP string, ports []v1.ServicePort, mutate func(*v1.Service)) *v1.Service {
	svc := &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       v1.ServiceSpec{ClusterIP: clusterIP, Ports: ports},
	}
	if mutate != nil {
		mutate(svc)
	}
	return svc
}

// svcPort is one Service port; targetPort 0 leaves TargetPort unset (the API defaults it to port).
func svcPort(name string, proto v1.Protocol, port, targetPort int32) v1.ServicePort {
	p := v1.ServicePort{Name: name, Protocol: proto, Port: port}
	if targetPort != 0 {
		p.TargetPort = intstr.FromInt32(targetPort)
	}
	return p
}

// namedTargetPort is a Service port whose targetPort is a container port name.
func namedTargetPort(name string, proto v1.Protocol, port int32, target string) v1.ServicePort {
	return v1.ServicePort{Name: name, Protocol: proto, Port: port, TargetPort: intstr.FromString(target)}
}

// slice returns EndpointSlice ns/sliceName of Service ns/svc.
func slice(ns, svc, sliceName string, at discovery.AddressType, ports []discovery.EndpointPort, eps ...discovery.Endpoint) *discovery.EndpointSlice {
	return &discovery.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns,
			Name:      sliceName,
			Labels:    map[string]string{discovery.LabelServiceName: svc},
		},
		AddressType: at,
		Ports:       ports,
		Endpoints:   eps,
	}
}

// slicePort is one EndpointSlice port (name and protocol always set, as the controller does).
func slicePort(name string, proto v1.Protocol, port int32) discovery.EndpointPort {
	return discovery.EndpointPort{Name: ptrTo(name), Protocol: ptrTo(proto), Port: ptrTo(port)}
}

// ep is an endpoint with no conditions at all (nil conditions mean ready and serving).
// node "" leaves NodeName unset.
func ep(addr, node string) discovery.Endpoint {
	e := discovery.Endpoint{Addresses: []string{addr}}
	if node != "" {
		e.NodeName = ptrTo(node)
	}
	return e
}

// epReady is an endpoint with only the Ready condition set.
func epReady(addr, node string, ready bool) discovery.Endpoint {
	e := ep(addr, node)
	e.Conditions.Ready = ptrTo(ready)
	return e
}

// epCond is an endpoint with all three conditions set.
func epCond(addr, node string, ready, serving, terminating bool) discovery.Endpoint {
	e := ep(addr, node)
	e.Conditions = discovery.EndpointConditions{Ready: ptrTo(ready), Serving: ptrTo(serving), Terminating: ptrTo(terminating)}
	return e
}

// withHints sets topology hints on an endpoint.
func withHints(e discovery.Endpoint, zones, nodes []string) discovery.Endpoint {
	h := &discovery.EndpointHints{}
	for _, z := range zones {
		h.ForZones = append(h.ForZones, discovery.ForZone{Name: z})
	}
	for _, n := range nodes {
		h.ForNodes = append(h.ForNodes, discovery.ForNode{Name: n})
	}
	e.Hints = h
	return e
}

// frontendsFor runs the package the way the agent does: the slices of svc through
// ServiceEndpoints, then Frontends. Slices of other Services may be passed: they must not leak.
func frontendsFor(svc *v1.Service, epSlices []*discovery.EndpointSlice, node Node) []Frontend {
	return Frontends(svc, ServiceEndpoints(epSlices, node.Name), node)
}

func mustAddrPorts(t *testing.T, ss ...string) []netip.AddrPort {
	t.Helper()
	var out []netip.AddrPort
	for _, s := range ss {
		ap, err := netip.ParseAddrPort(strings.TrimSpace(s))
		if err != nil {
			t.Fatalf("bad address:port %q in test table: %v", s, err)
		}
		out = append(out, ap)
	}
	return out
}

func fmtAddrPorts(aps []netip.AddrPort) string {
	if len(aps) == 0 {
		return "[]"
	}
	ss := make([]string, len(aps))
	for i, ap := range aps {
		ss[i] = ap.String()
	}
	return "[" + strings.Join(ss, ", ") + "]"
}

func fmtFrontend(f Frontend) string {
	return fmt.Sprintf("%s %s svc=%s type=%s backends=%s noBackends=%d affinity=%d preserveClientIP=%v sourceRanges=%v",
		f.Scope, f.FrontendKey, f.Service, f.Type, fmtAddrPorts(f.Backends), f.NoBackends, f.AffinityTimeoutSec,
		f.PreserveClientIP, f.LoadBalancerSourceRanges)
}

func fmtFrontends(fes []Frontend) string {
	var b strings.Builder
	for _, f := range fes {
		b.WriteString("\n\t")
		b.WriteString(fmtFrontend(f))
	}
	if b.Len() == 0 {
		return " (none)"
	}
	return b.String()
}

// sortedCopy returns aps sorted, leaving aps alone.
func sortedCopy(aps []netip.AddrPort) []netip.AddrPort {
	out := slices.Clone(aps)
	slices.SortFunc(out, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return out
}
