package lbstate

// The ClusterIP packet-flow cases of upstream kube-proxy's nftables proxier tests
// (k8s.io/kubernetes v1.36.3, pkg/proxy/nftables/proxier_test.go), replayed against lbstate from
// the point of view of a client on this node.
//
// testdata/kube_proxy_nftables_packet_flows.tsv is a copy of the reference table; every one of
// its rows whose destination is a ClusterIP must have a case here (TestReferenceTableCoverage).
// The Services and EndpointSlices are rebuilt from the upstream tests (same namespaces, names,
// ClusterIPs, ports, targetPorts, endpoint addresses, conditions and node names, traffic
// policies); the upstream node is "test-node" (testNodeName there).
//
// How kpr's socket LB maps onto kube-proxy's verdicts:
//
//   - a backend set: the frontend (VIP, port, protocol) exists and its backends are that set.
//   - REJECT: either the frontend exists with no backends and NoBackends == Reject (connect()
//     fails with ECONNREFUSED), or some frontend has this VIP but none has this port/protocol:
//     the datapath's per-VIP wildcard entry refuses it (kube-proxy's cluster-ips-check "Reject
//     traffic to invalid ports of ClusterIPs").
//   - DROP: either no frontend has the VIP at all but it lies in the Service CIDR (an
//     unallocated ClusterIP: kube-proxy drops it with "Drop traffic to unallocated ClusterIPs",
//     the datapath's Service CIDR trie refuses it), or the frontend exists with no backends and
//     NoBackends == Unreachable. kube-proxy drops those packets and the client times out; kpr
//     fails connect() with EHOSTUNREACH at once in both cases. That is a deliberate difference
//     (see Verdict Unreachable).
//
// The masq column of the reference table does not apply: the socket LB rewrites the
// destination of the socket itself, so there is no packet NAT and the backend sees the client's
// real address (a pod's own IP, the node's IP for host processes). Hairpin traffic (a pod
// reaching itself through the VIP) needs no masquerade either: the pod simply connects to its
// own address. "masqueradeAll" and "no LocalTrafficDetector" variants of
// TestInternalExternalMasquerade only change masq for the ClusterIP rows, never the output, so
// one set of rows covers all four of its configurations.
//
// "node to ClusterIP" rows are host processes: they go through the same socket-scope frontend
// as pods. "external to ClusterIP" rows are packets arriving from off the node; the socket LB
// never sees them (that is the external scope, a later issue), so these cases only assert the
// backend set the ClusterIP frontend carries, which is what kube-proxy gives those packets.
//
// SCTP rows: the frontend must exist with the right backends; the datapath handles SCTP later.

import (
	"bufio"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
)

// upstream constants (pkg/proxy/nftables/proxier_test.go).
const (
	testNodeName = "test-node"
)

// via is how kpr arrives at the reference's output for one (VIP, port, protocol).
type via int

const (
	viaBackends    via = iota // translated to one of the frontend's backends
	viaRefused                // frontend with no backends, NoBackends == Reject: ECONNREFUSED
	viaWildcard               // VIP known, no frontend for the port/protocol: refused by the wildcard
	viaUnreachable            // frontend with no backends, NoBackends == Unreachable: EHOSTUNREACH
	viaUnallocated            // no frontend has the address, inside the Service CIDR: EHOSTUNREACH
	viaNotAVIP                // no frontend has the address, outside the Service CIDR: untranslated
)

func (v via) String() string {
	return [...]string{"backends", "refused (no backends, Reject)", "refused (VIP wildcard, port/protocol not served)",
		"unreachable (no backends, Unreachable)", "unreachable (unallocated address in the Service CIDR)",
		"not a VIP (untranslated)"}[v]
}

// verdictOf is the reference table's word for v.
func verdictOf(v via) string {
	switch v {
	case viaRefused, viaWildcard:
		return "REJECT"
	case viaUnreachable, viaUnallocated:
		return "DROP"
	}
	return ""
}

// refWorld is the Services and EndpointSlices kube-proxy had at the time a row was checked.
type refWorld struct {
	services []*v1.Service
	slices   []*discovery.EndpointSlice
}

// frontends is every socket-scope frontend of the world, each Service given its own slices.
func (w refWorld) frontends(t *testing.T) []Frontend {
	t.Helper()
	node := Node{Name: testNodeName}
	var out []Frontend
	for _, svc := range w.services {
		var own []*discovery.EndpointSlice
		for _, s := range w.slices {
			if s.Namespace == svc.Namespace && s.Labels[discovery.LabelServiceName] == svc.Name {
				own = append(own, s)
			}
		}
		fes := frontendsFor(svc, own, node)
		for _, f := range fes {
			if f.Scope != ScopeSocket || f.Type != ClusterIP {
				t.Errorf("Frontends(%s/%s) returned a non socket-scope ClusterIP frontend: %s", svc.Namespace, svc.Name, fmtFrontend(f))
			}
		}
		out = append(out, fes...)
	}
	return out
}

// upstreamServiceCIDR is the Service CIDR of the upstream tests, as kpr's agent would program it.
var upstreamServiceCIDR = netip.MustParsePrefix("172.30.0.0/16")

// connect is what the socket LB does with a connect() to vip:port/proto, given the frontends
// and the Service CIDR upstreamServiceCIDR.
func connect(fes []Frontend, vip netip.Addr, port uint16, proto v1.Protocol) (via, []netip.AddrPort, error) {
	var match []Frontend
	vipKnown := false
	for _, f := range fes {
		if f.Scope != ScopeSocket || f.Addr != vip {
			continue
		}
		vipKnown = true
		if f.Port == port && f.Protocol == proto {
			match = append(match, f)
		}
	}
	switch {
	case len(match) > 1:
		return 0, nil, fmt.Errorf("%d frontends share the key %s/%s", len(match), netip.AddrPortFrom(vip, port), proto)
	case len(match) == 1 && len(match[0].Backends) > 0:
		return viaBackends, match[0].Backends, nil
	case len(match) == 1 && match[0].NoBackends == Unreachable:
		return viaUnreachable, nil, nil
	case len(match) == 1:
		return viaRefused, nil, nil
	case vipKnown:
		return viaWildcard, nil, nil
	case upstreamServiceCIDR.Contains(vip):
		return viaUnallocated, nil, nil
	}
	return viaNotAVIP, nil, nil
}

// refCase is one row of the reference table, with the objects behind it.
type refCase struct {
	test  string // upstream test function (the table's "test" column)
	step  string // upstream sub-test or step ("" if none)
	row   string // the table's "name" column
	world refWorld
	proto v1.Protocol
	dest  string // the ClusterIP
	port  uint16
	// output as in the table: "ip:port, ip:port", "REJECT" or "DROP".
	output string
	// how kpr gets there; for backend sets it stays viaBackends.
	via via
}

func (c refCase) id() string {
	if c.step == "" {
		return c.test + " / " + c.row + " [" + string(c.proto) + "]"
	}
	return c.test + " / " + c.step + " / " + c.row + " [" + string(c.proto) + "]"
}

// ---- The upstream scenarios. ----

// TestNoEndpointsReject: a LoadBalancer Service with no EndpointSlice at all.
func worldNoEndpointsReject() refWorld {
	return refWorld{services: []*v1.Service{
		service("ns1", "svc1", "172.30.0.41", []v1.ServicePort{{Name: "p80", Protocol: v1.ProtocolTCP, Port: 80, NodePort: 3001}}, func(s *v1.Service) {
			s.Spec.Type = v1.ServiceTypeLoadBalancer
			s.Spec.ExternalIPs = []string{"192.168.99.11"}
			s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "1.2.3.4"}}
		}),
	}}
}

// TestClusterIPGeneral: svc1 with one port, svc2 with TCP/UDP/SCTP on the same port and a
// targetPort.
func worldClusterIPGeneral() refWorld {
	return refWorld{
		services: []*v1.Service{
			service("ns1", "svc1", "172.30.0.41", []v1.ServicePort{svcPort("http", v1.ProtocolTCP, 80, 0)}, nil),
			service("ns2", "svc2", "172.30.0.42", []v1.ServicePort{
				svcPort("http", v1.ProtocolTCP, 80, 0),
				svcPort("https", v1.ProtocolTCP, 443, 8443),
				svcPort("dns-udp", v1.ProtocolUDP, 53, 0),
				svcPort("dns-tcp", v1.ProtocolTCP, 53, 5353),
				svcPort("dns-sctp", v1.ProtocolSCTP, 53, 0),
			}, nil),
		},
		slices: []*discovery.EndpointSlice{
			slice("ns1", "svc1", "svc1-1", discovery.AddressTypeIPv4,
				[]discovery.EndpointPort{slicePort("http", v1.ProtocolTCP, 80)},
				ep("10.180.0.1", testNodeName)),
			slice("ns2", "svc2", "svc2-1", discovery.AddressTypeIPv4,
				[]discovery.EndpointPort{
					slicePort("http", v1.ProtocolTCP, 80),
					slicePort("https", v1.ProtocolTCP, 8443),
					slicePort("dns-udp", v1.ProtocolUDP, 53),
					slicePort("dns-tcp", v1.ProtocolTCP, 5353),
					slicePort("dns-sctp", v1.ProtocolSCTP, 53),
				},
				ep("10.180.0.1", testNodeName),
				ep("10.180.2.1", "node2")),
		},
	}
}

// TestLoadBalancer: a LoadBalancer Service with source ranges (which do not apply to ClusterIP).
func worldLoadBalancer() refWorld {
	return refWorld{
		services: []*v1.Service{
			service("ns1", "svc1", "172.30.0.41", []v1.ServicePort{{Name: "p80", Protocol: v1.ProtocolTCP, Port: 80, NodePort: 3001}}, func(s *v1.Service) {
				s.Spec.Type = v1.ServiceTypeLoadBalancer
				s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "1.2.3.4"}, {IP: "5.6.7.8"}}
				s.Spec.LoadBalancerSourceRanges = []string{"192.168.0.0/24", " 203.0.113.0/25"}
			}),
		},
		slices: []*discovery.EndpointSlice{
			slice("ns1", "svc1", "svc1-1", discovery.AddressTypeIPv4,
				[]discovery.EndpointPort{slicePort("p80", v1.ProtocolTCP, 80)},
				ep("10.180.0.1", testNodeName)),
		},
	}
}

// TestNodePorts: a NodePort Service, single-stack IPv4 or IPv6 (--nodeport-addresses, the
// other axis of the upstream sub-tests, does not touch ClusterIP traffic).
func worldNodePorts(ipv6 bool) refWorld {
	svcIP, ep1, ep2, at := "172.30.0.41", "10.180.0.1", "10.180.2.1", discovery.AddressTypeIPv4
	if ipv6 {
		svcIP, ep1, ep2, at = "fd00:172:30::41", "fd00:10:180::1", "fd00:10:180::2:1", discovery.AddressTypeIPv6
	}
	return refWorld{
		services: []*v1.Service{
			service("ns1", "svc1", svcIP, []v1.ServicePort{{Name: "p80", Protocol: v1.ProtocolTCP, Port: 80, NodePort: 3001}}, func(s *v1.Service) {
				s.Spec.Type = v1.ServiceTypeNodePort
			}),
		},
		slices: []*discovery.EndpointSlice{
			slice("ns1", "svc1", "svc1-1", at,
				[]discovery.EndpointPort{slicePort("p80", v1.ProtocolTCP, 80)},
				ep(ep1, "other-node"),
				ep(ep2, testNodeName)),
		},
	}
}

// TestExternalTrafficPolicyLocal / TestExternalTrafficPolicyCluster: one local and one remote
// endpoint; externalTrafficPolicy must not change what ClusterIP clients get.
func worldExternalTrafficPolicy(etp v1.ServiceExternalTrafficPolicy) refWorld {
	port := svcPort("p80", v1.ProtocolTCP, 80, 80)
	port.NodePort = 3001
	return refWorld{
		services: []*v1.Service{
			service("ns1", "svc1", "172.30.0.41", []v1.ServicePort{port}, func(s *v1.Service) {
				s.Spec.Type = v1.ServiceTypeLoadBalancer
				s.Spec.ExternalTrafficPolicy = etp
				s.Spec.ExternalIPs = []string{"192.168.99.11"}
				s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "1.2.3.4"}}
				if etp == v1.ServiceExternalTrafficPolicyLocal {
					s.Spec.HealthCheckNodePort = 30000
				}
			}),
		},
		slices: []*discovery.EndpointSlice{
			slice("ns1", "svc1", "svc1-1", discovery.AddressTypeIPv4,
				[]discovery.EndpointPort{slicePort("p80", v1.ProtocolTCP, 80)},
				ep("10.180.0.1", "other-node"),
				ep("10.180.2.1", testNodeName)),
		},
	}
}

// TestInternalTrafficPolicy: an unnamed port; endpoints have only Ready set. withSlice false is
// the step after the EndpointSlice is deleted.
func worldInternalTrafficPolicy(itp v1.ServiceInternalTrafficPolicy, withSlice bool, eps ...[2]string) refWorld {
	w := refWorld{services: []*v1.Service{
		service("ns1", "svc1", "172.30.1.1", []v1.ServicePort{{Name: "", Port: 80, Protocol: v1.ProtocolTCP}}, func(s *v1.Service) {
			s.Spec.Selector = map[string]string{"foo": "bar"}
			s.Spec.InternalTrafficPolicy = ptrTo(itp)
		}),
	}}
	if withSlice {
		s := slice("ns1", "svc1", "svc1-1", discovery.AddressTypeIPv4, []discovery.EndpointPort{slicePort("", v1.ProtocolTCP, 80)})
		for _, e := range eps {
			s.Endpoints = append(s.Endpoints, epReady(e[0], e[1], true))
		}
		w.slices = append(w.slices, s)
	}
	return w
}

// TestTerminatingEndpointsTrafficPolicyLocal / ...Cluster: a LoadBalancer Service (the
// externalTrafficPolicy is the difference) and, per step, one EndpointSlice (nil: deleted).
func worldTerminating(etp v1.ServiceExternalTrafficPolicy, eps ...discovery.Endpoint) refWorld {
	w := refWorld{services: []*v1.Service{
		service("ns1", "svc1", "172.30.1.1", []v1.ServicePort{svcPort("", v1.ProtocolTCP, 80, 80)}, func(s *v1.Service) {
			s.Spec.Type = v1.ServiceTypeLoadBalancer
			s.Spec.ExternalTrafficPolicy = etp
			s.Spec.HealthCheckNodePort = 30000
			s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "1.2.3.4"}}
		}),
	}}
	if eps != nil {
		w.slices = append(w.slices, slice("ns1", "svc1", "svc1-1", discovery.AddressTypeIPv4,
			[]discovery.EndpointPort{slicePort("", v1.ProtocolTCP, 80)}, eps...))
	}
	return w
}

// TestInternalExternalMasquerade: svc1 plain, svc2 eTP:Local, svc3 iTP:Local; one local and one
// remote endpoint each.
func worldInternalExternalMasquerade() refWorld {
	var w refWorld
	for i, mutate := range []func(*v1.Service){
		nil,
		func(s *v1.Service) { s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal },
		func(s *v1.Service) { s.Spec.InternalTrafficPolicy = ptrTo(v1.ServiceInternalTrafficPolicyLocal) },
	} {
		n := i + 1
		ns, name := fmt.Sprintf("ns%d", n), fmt.Sprintf("svc%d", n)
		lbIP := []string{"1.2.3.4", "5.6.7.8", "9.10.11.12"}[i]
		w.services = append(w.services, service(ns, name, fmt.Sprintf("172.30.0.4%d", n),
			[]v1.ServicePort{{Name: "p80", Port: 80, Protocol: v1.ProtocolTCP, NodePort: int32(3000 + n)}},
			func(s *v1.Service) {
				s.Spec.Type = v1.ServiceTypeLoadBalancer
				s.Spec.HealthCheckNodePort = int32(30000 + n)
				s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: lbIP}}
				if mutate != nil {
					mutate(s)
				}
			}))
		w.slices = append(w.slices, slice(ns, name, name+"-1", discovery.AddressTypeIPv4,
			[]discovery.EndpointPort{slicePort("p80", v1.ProtocolTCP, 80)},
			ep(fmt.Sprintf("10.180.0.%d", n), testNodeName),
			ep(fmt.Sprintf("10.180.1.%d", n), "remote")))
	}
	return w
}

func referenceCases() []refCase {
	const tcp, udp, sctp = v1.ProtocolTCP, v1.ProtocolUDP, v1.ProtocolSCTP
	var cases []refCase

	// TestNoEndpointsReject
	cases = append(cases, refCase{test: "TestNoEndpointsReject", row: "pod to cluster IP with no endpoints",
		world: worldNoEndpointsReject(), proto: tcp, dest: "172.30.0.41", port: 80, output: "REJECT", via: viaRefused})

	// TestClusterIPGeneral
	g := worldClusterIPGeneral()
	for _, c := range []refCase{
		{row: "simple clusterIP", proto: tcp, dest: "172.30.0.41", port: 80, output: "10.180.0.1:80"},
		// Source 10.180.0.1 is the endpoint itself (masq true upstream).
		{row: "hairpin to cluster IP", proto: tcp, dest: "172.30.0.41", port: 80, output: "10.180.0.1:80"},
		{row: "clusterIP with multiple endpoints", proto: tcp, dest: "172.30.0.42", port: 80, output: "10.180.0.1:80, 10.180.2.1:80"},
		{row: "clusterIP with TargetPort", proto: tcp, dest: "172.30.0.42", port: 443, output: "10.180.0.1:8443, 10.180.2.1:8443"},
		{row: "clusterIP with TCP, UDP, and SCTP on same port (TCP)", proto: tcp, dest: "172.30.0.42", port: 53, output: "10.180.0.1:5353, 10.180.2.1:5353"},
		// Upstream names this UDP row "(TCP)" too; the protocol column is what counts.
		{row: "clusterIP with TCP, UDP, and SCTP on same port (TCP)", proto: udp, dest: "172.30.0.42", port: 53, output: "10.180.0.1:53, 10.180.2.1:53"},
		{row: "clusterIP with TCP, UDP, and SCTP on same port (SCTP)", proto: sctp, dest: "172.30.0.42", port: 53, output: "10.180.0.1:53, 10.180.2.1:53"},
		{row: "TCP-only port does not match UDP traffic", proto: udp, dest: "172.30.0.42", port: 80, output: "REJECT", via: viaWildcard},
		{row: "svc1 does not accept svc2's ports", proto: tcp, dest: "172.30.0.41", port: 443, output: "REJECT", via: viaWildcard},
		{row: "packet to unallocated cluster ip", proto: tcp, dest: "172.30.0.50", port: 80, output: "DROP", via: viaUnallocated},
	} {
		c.test, c.world = "TestClusterIPGeneral", g
		cases = append(cases, c)
	}

	// TestLoadBalancer
	cases = append(cases, refCase{test: "TestLoadBalancer", row: "pod to cluster IP",
		world: worldLoadBalancer(), proto: tcp, dest: "172.30.0.41", port: 80, output: "10.180.0.1:80"})

	// TestNodePorts: four sub-tests, two address families.
	for _, st := range []struct {
		name string
		ipv6 bool
	}{{"ipv4", false}, {"ipv4, multiple nodeport-addresses", false}, {"ipv6", true}, {"ipv6, multiple nodeport-addresses", true}} {
		c := refCase{test: "TestNodePorts", step: st.name, row: "pod to cluster IP", world: worldNodePorts(st.ipv6),
			proto: tcp, dest: "172.30.0.41", port: 80, output: "10.180.0.1:80, 10.180.2.1:80"}
		if st.ipv6 {
			c.dest, c.output = "fd00:172:30::41", "[fd00:10:180::1]:80, [fd00:10:180::2:1]:80"
		}
		cases = append(cases, c)
	}

	// TestExternalTrafficPolicyLocal / Cluster
	cases = append(cases,
		refCase{test: "TestExternalTrafficPolicyLocal", row: "pod to cluster IP hits both endpoints, unmasqueraded",
			world: worldExternalTrafficPolicy(v1.ServiceExternalTrafficPolicyLocal), proto: tcp, dest: "172.30.0.41", port: 80,
			output: "10.180.0.1:80, 10.180.2.1:80"},
		refCase{test: "TestExternalTrafficPolicyCluster", row: "pod to cluster IP hits both endpoints, unmasqueraded",
			world: worldExternalTrafficPolicy(v1.ServiceExternalTrafficPolicyCluster), proto: tcp, dest: "172.30.0.41", port: 80,
			output: "10.180.0.1:80, 10.180.2.1:80"},
	)

	// TestInternalTrafficPolicy: each sub-test, then the same after the slice is deleted.
	for _, st := range []struct {
		name   string
		itp    v1.ServiceInternalTrafficPolicy
		eps    [][2]string
		row    string
		output string
		via    via
	}{
		{"internalTrafficPolicy is cluster", v1.ServiceInternalTrafficPolicyCluster,
			[][2]string{{"10.0.1.1", testNodeName}, {"10.0.1.2", "node1"}, {"10.0.1.3", "node2"}},
			"pod to ClusterIP hits all endpoints", "10.0.1.1:80, 10.0.1.2:80, 10.0.1.3:80", viaBackends},
		{"internalTrafficPolicy is local and there is one local endpoint", v1.ServiceInternalTrafficPolicyLocal,
			[][2]string{{"10.0.1.1", testNodeName}, {"10.0.1.2", "node1"}, {"10.0.1.3", "node2"}},
			"pod to ClusterIP hits only local endpoint", "10.0.1.1:80", viaBackends},
		{"internalTrafficPolicy is local and there are multiple local endpoints", v1.ServiceInternalTrafficPolicyLocal,
			[][2]string{{"10.0.1.1", testNodeName}, {"10.0.1.2", testNodeName}, {"10.0.1.3", "node2"}},
			"pod to ClusterIP hits all local endpoints", "10.0.1.1:80, 10.0.1.2:80", viaBackends},
		{"internalTrafficPolicy is local and there are no local endpoints", v1.ServiceInternalTrafficPolicyLocal,
			[][2]string{{"10.0.1.1", "node0"}, {"10.0.1.2", "node1"}, {"10.0.1.3", "node2"}},
			"no endpoints", "DROP", viaUnreachable},
	} {
		cases = append(cases,
			refCase{test: "TestInternalTrafficPolicy", step: st.name, row: st.row, world: worldInternalTrafficPolicy(st.itp, true, st.eps...),
				proto: tcp, dest: "172.30.1.1", port: 80, output: st.output, via: st.via},
			refCase{test: "TestInternalTrafficPolicy", step: st.name + " (slice deleted)", row: "endpoints deleted", world: worldInternalTrafficPolicy(st.itp, false),
				proto: tcp, dest: "172.30.1.1", port: 80, output: "REJECT", via: viaRefused},
		)
	}

	// TestTerminatingEndpointsTrafficPolicyLocal: four steps, each followed by the slice's
	// deletion. externalTrafficPolicy Local does not apply to ClusterIP traffic.
	local := v1.ServiceExternalTrafficPolicyLocal
	for _, st := range []struct {
		name   string
		eps    []discovery.Endpoint
		row    string
		output string
		via    via
	}{
		{"ready endpoints exist", []discovery.Endpoint{
			epCond("10.0.1.1", testNodeName, true, true, false),
			epCond("10.0.1.2", testNodeName, true, true, false),
			epCond("10.0.1.3", testNodeName, false, true, true),
			epCond("10.0.1.4", testNodeName, false, false, true),
			epCond("10.0.1.5", "node-1", true, true, false),
		}, "pod to clusterIP", "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", viaBackends},
		{"only terminating endpoints exist", []discovery.Endpoint{
			epCond("10.0.1.2", testNodeName, false, true, true),
			epCond("10.0.1.3", testNodeName, false, true, true),
			epCond("10.0.1.4", testNodeName, false, false, true),
			epCond("10.0.1.5", "node-1", true, true, false),
		}, "pod to clusterIP", "10.0.1.5:80", viaBackends},
		{"terminating endpoints on remote node", []discovery.Endpoint{
			epCond("10.0.1.5", "node-1", false, true, true),
		}, "pod to clusterIP", "10.0.1.5:80", viaBackends},
		{"no usable endpoints on any node", []discovery.Endpoint{
			epCond("10.0.1.5", testNodeName, false, false, true),
			epCond("10.0.1.5", "node-1", false, false, true),
		}, "pod to clusterIP, no usable endpoints", "REJECT", viaRefused},
	} {
		cases = append(cases,
			refCase{test: "TestTerminatingEndpointsTrafficPolicyLocal", step: st.name, row: st.row, world: worldTerminating(local, st.eps...),
				proto: tcp, dest: "172.30.1.1", port: 80, output: st.output, via: st.via},
			refCase{test: "TestTerminatingEndpointsTrafficPolicyLocal", step: st.name + " (slice deleted)", row: "pod to clusterIP after endpoints deleted",
				world: worldTerminating(local), proto: tcp, dest: "172.30.1.1", port: 80, output: "REJECT", via: viaRefused},
		)
	}

	// TestTerminatingEndpointsTrafficPolicyCluster: the same steps with other endpoints.
	cluster := v1.ServiceExternalTrafficPolicyCluster
	for _, st := range []struct {
		name   string
		eps    []discovery.Endpoint
		output string
		via    via
	}{
		{"ready endpoints exist", []discovery.Endpoint{
			epCond("10.0.1.1", testNodeName, true, true, false),
			epCond("10.0.1.2", testNodeName, true, true, false),
			epCond("10.0.1.3", "another-node", false, true, true),
			epCond("10.0.1.4", "another-node", false, false, true),
			epCond("10.0.1.5", "another-node", true, true, false),
		}, "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", viaBackends},
		{"only terminating endpoints exist", []discovery.Endpoint{
			epCond("10.0.1.2", testNodeName, false, true, true),
			epCond("10.0.1.3", testNodeName, false, true, true),
			epCond("10.0.1.4", "another-node", false, false, true),
			epCond("10.0.1.5", "another-node", false, true, true),
		}, "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80", viaBackends},
		{"terminating endpoints on remote node", []discovery.Endpoint{
			epCond("10.0.1.5", "node-1", false, true, true),
		}, "10.0.1.5:80", viaBackends},
		{"no usable endpoints on any node", []discovery.Endpoint{
			epCond("10.0.1.5", testNodeName, false, false, true),
			epCond("10.0.1.5", "node-1", false, false, true),
		}, "REJECT", viaRefused},
	} {
		cases = append(cases,
			refCase{test: "TestTerminatingEndpointsTrafficPolicyCluster", step: st.name, row: "pod to clusterIP", world: worldTerminating(cluster, st.eps...),
				proto: tcp, dest: "172.30.1.1", port: 80, output: st.output, via: st.via},
			refCase{test: "TestTerminatingEndpointsTrafficPolicyCluster", step: st.name + " (slice deleted)", row: "pod to clusterIP after endpoints deleted",
				world: worldTerminating(cluster), proto: tcp, dest: "172.30.1.1", port: 80, output: "REJECT", via: viaRefused},
		)
	}

	// TestInternalExternalMasquerade: pod, node and external clients to each ClusterIP.
	m := worldInternalExternalMasquerade()
	for _, c := range []refCase{
		{row: "pod to ClusterIP", dest: "172.30.0.41", output: "10.180.0.1:80, 10.180.1.1:80"},
		{row: "node to ClusterIP", dest: "172.30.0.41", output: "10.180.0.1:80, 10.180.1.1:80"},
		{row: "external to ClusterIP", dest: "172.30.0.41", output: "10.180.0.1:80, 10.180.1.1:80"},
		{row: "pod to ClusterIP with eTP:Local", dest: "172.30.0.42", output: "10.180.0.2:80, 10.180.1.2:80"},
		{row: "node to ClusterIP with eTP:Local", dest: "172.30.0.42", output: "10.180.0.2:80, 10.180.1.2:80"},
		{row: "external to ClusterIP with eTP:Local", dest: "172.30.0.42", output: "10.180.0.2:80, 10.180.1.2:80"},
		{row: "pod to ClusterIP with iTP:Local", dest: "172.30.0.43", output: "10.180.0.3:80"},
		{row: "node to ClusterIP with iTP:Local", dest: "172.30.0.43", output: "10.180.0.3:80"},
		{row: "external to ClusterIP with iTP:Local", dest: "172.30.0.43", output: "10.180.0.3:80"},
	} {
		c.test, c.world, c.proto, c.port = "TestInternalExternalMasquerade", m, tcp, 80
		cases = append(cases, c)
	}
	return cases
}

func TestReference(t *testing.T) {
	for _, tc := range referenceCases() {
		t.Run(tc.id(), func(t *testing.T) {
			vip, err := netip.ParseAddr(tc.dest)
			if err != nil {
				t.Fatalf("%s: bad dest %q: %v", tc.id(), tc.dest, err)
			}
			// The table's own consistency: REJECT/DROP rows say how kpr gets there, backend
			// rows do not.
			var want []netip.AddrPort
			switch tc.output {
			case "REJECT", "DROP":
				if verdictOf(tc.via) != tc.output {
					t.Fatalf("%s: test table error: output %s with via %s", tc.id(), tc.output, tc.via)
				}
			default:
				if tc.via != viaBackends {
					t.Fatalf("%s: test table error: backend output with via %s", tc.id(), tc.via)
				}
				want = mustAddrPorts(t, strings.Split(tc.output, ",")...)
			}

			fes := tc.world.frontends(t)
			got, backends, err := connect(fes, vip, tc.port, tc.proto)
			if err != nil {
				t.Fatalf("%s: %v; frontends:%s", tc.id(), err, fmtFrontends(fes))
			}
			if got != tc.via {
				t.Fatalf("%s: connect to %s/%s: got %s (%q), want %s (%q); frontends:%s",
					tc.id(), netip.AddrPortFrom(vip, tc.port), tc.proto, got, verdictOf(got), tc.via, tc.output, fmtFrontends(fes))
			}
			if got == viaBackends && !slices.Equal(sortedCopy(backends), sortedCopy(want)) {
				t.Errorf("%s: connect to %s/%s: backends %s, want %s",
					tc.id(), netip.AddrPortFrom(vip, tc.port), tc.proto, fmtAddrPorts(sortedCopy(backends)), fmtAddrPorts(want))
			}
		})
	}
}

// ---- Coverage of the reference table. ----

const referenceTable = "testdata/kube_proxy_nftables_packet_flows.tsv"

// referenceClusterIPRows is how many rows of the table target a ClusterIP; it guards the row
// selection below against silently matching nothing.
const referenceClusterIPRows = 39

type tsvRow struct {
	line                                       int
	test, name, proto, source, dest, port, out string
	raw                                        string
}

func readReferenceTable(t *testing.T) []tsvRow {
	t.Helper()
	f, err := os.Open(referenceTable)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var rows []tsvRow
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		if n == 1 {
			continue // header
		}
		cols := strings.Split(sc.Text(), "\t")
		if len(cols) != 8 {
			t.Fatalf("%s:%d: %d columns, want 8", referenceTable, n, len(cols))
		}
		rows = append(rows, tsvRow{line: n, test: cols[0], name: cols[1], proto: cols[2], source: cols[3],
			dest: cols[4], port: cols[5], out: cols[6], raw: sc.Text()})
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return rows
}

// toClusterIP says whether a row's destination is a ClusterIP: the symbol svcIP, or a literal
// in the upstream service CIDR 172.30.0.0/16.
func (r tsvRow) toClusterIP() bool {
	return r.dest == "svcIP" || strings.HasPrefix(r.dest, `"172.30.`)
}

// literal returns the value of a quoted Go string literal column, or ok false for a symbol or
// expression (resolved by hand in the cases, from the upstream test's variables).
func literal(col string) (string, bool) {
	s, err := strconv.Unquote(col)
	return s, err == nil
}

// matches says whether case c reproduces row r: same test, name and protocol, and the same
// destination, port and output wherever the table gives a literal.
func (r tsvRow) matches(c refCase) bool {
	if r.test != c.test || r.name != c.row || v1.Protocol(strings.TrimPrefix(r.proto, "v1.Protocol")) != c.proto {
		return false
	}
	if d, ok := literal(r.dest); ok && d != c.dest {
		return false
	}
	if p, err := strconv.Atoi(r.port); err == nil && p != int(c.port) {
		return false
	}
	if o, ok := literal(r.out); ok && o != c.output {
		return false
	}
	return true
}

// TestReferenceTableCoverage checks that every ClusterIP row of the reference table has a case
// (as many as the table repeats it), and that every case stands for a row of the table.
func TestReferenceTableCoverage(t *testing.T) {
	rows := readReferenceTable(t)
	cases := referenceCases()

	var clusterIP []tsvRow
	for _, r := range rows {
		if r.toClusterIP() {
			clusterIP = append(clusterIP, r)
		}
	}
	if len(clusterIP) != referenceClusterIPRows {
		t.Errorf("%d rows of %s target a ClusterIP, want %d", len(clusterIP), referenceTable, referenceClusterIPRows)
	}

	seen := map[string]int{}
	for _, r := range clusterIP {
		seen[r.raw]++
	}
	for _, r := range clusterIP {
		if seen[r.raw] == 0 {
			continue // already checked with an identical row
		}
		n := 0
		for _, c := range cases {
			if r.matches(c) {
				n++
			}
		}
		if n < seen[r.raw] {
			t.Errorf("%s:%d (%s / %s, %s %s:%s -> %s): %d matching cases, want at least %d",
				referenceTable, r.line, r.test, r.name, r.proto, r.dest, r.port, r.out, n, seen[r.raw])
		}
		seen[r.raw] = 0
	}

	for _, c := range cases {
		if !slices.ContainsFunc(clusterIP, func(r tsvRow) bool { return r.matches(c) }) {
			t.Errorf("case %s (%s %s:%d -> %s) matches no ClusterIP row of %s", c.id(), c.proto, c.dest, c.port, c.output, referenceTable)
		}
	}
}
