package lbstate

// The packet-flow cases of upstream kube-proxy's nftables proxier tests (k8s.io/kubernetes
// v1.36.3, pkg/proxy/nftables/proxier_test.go), replayed against lbstate as data.
//
// testdata/kube_proxy_nftables_packet_flows.tsv is a copy of the reference table; every one of
// its rows must have a case here, as many as the table repeats it, with the same source,
// destination, port, output and masq once the table's symbols are resolved from the upstream
// test (TestReferenceTableCoverage). No row is left out: each one is expressible as data.
// The Services and EndpointSlices are rebuilt from the upstream tests (same namespaces, names,
// ClusterIPs, ports, NodePorts, external and load-balancer IPs, source ranges, targetPorts,
// endpoint addresses, conditions and node names, traffic policies); the upstream node is
// "test-node" (testNodeName there). Its NodePort addresses are what upstream's
// --nodeport-addresses selects among the fake node's addresses: testNodeIP and testNodeIPv6
// by default, more in the "multiple nodeport-addresses" sub-tests of TestNodePorts. That is
// the nodePortAddrs parameter of AllFrontends, and rows about secondary node IPs are answered
// by it. ExternalClusterIP is on, as kube-proxy serves off-node traffic to ClusterIPs.
//
// Which frontend a row checks depends on its source:
//   - a pod ("10.0.0.2", podIP, the ClusterIP rows' 10.180.x.y) or the node itself (testNodeIP,
//     nodeIP, and a load-balancer IP bound on the node): the socket-scope frontend of the
//     destination, since kpr's socket LB translates every connection made on the node;
//   - testExternalClient, testExternalClientBlocked, externalClientIP: the external-scope one.
//
// How a lookup maps onto kube-proxy's verdicts:
//
//   - a backend set: the frontend (address, port, protocol, scope) exists, the source passes its
//     LoadBalancerSourceRanges, and its backends are that set.
//   - REJECT: either the frontend exists with no backends and NoBackends == Reject, or the
//     address is a ClusterIP (Type.OwnsAddress) of some frontend of the scope but none has
//     this port/protocol: the datapath's per-address wildcard entry refuses it (kube-proxy's
//     "Reject traffic to invalid ports of ClusterIPs").
//   - DROP: the frontend exists but the source is outside its LoadBalancerSourceRanges (the
//     datapath enforces them); or it exists with no backends and NoBackends == Unreachable; or,
//     in the socket scope, no frontend has the address but it lies in the Service CIDR (an
//     unallocated ClusterIP: the datapath's Service CIDR trie refuses it). kube-proxy drops
//     those packets; for local clients kpr fails connect() with EHOSTUNREACH at once instead
//     (see Verdict Unreachable and docs/kube-proxy-differences.md).
//   - "" (not kube-proxy's): no frontend of the scope has the address; the packet passes
//     untouched ("secondary nodeIP ignores NodePorts").
//
// The masq column: in the external scope it is !PreserveClientIP of the frontend (checked
// for rows that reach backends). In the socket scope kpr never masquerades: the socket LB
// rewrites the destination of the socket itself, so there is no packet NAT and the backend sees
// the client's real address (a pod's own IP, the node's IP for host processes); every
// socket-scope frontend says so with PreserveClientIP true, whatever kube-proxy's masq.
// Hairpin traffic (a pod reaching itself through a VIP) needs no masquerade either: the pod
// simply connects to its own address. The "masqueradeAll" and "no LocalTrafficDetector"
// variants of TestInternalExternalMasquerade change only masq for socket-level rows, and the
// short-circuit of pod traffic that kpr's socket LB always has, so the table (and this file)
// keeps its base configuration only.
//
// SCTP rows: the frontend must exist with the right backends; the datapath handles SCTP later.

import (
	"bufio"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
)

// upstream constants (pkg/proxy/nftables/proxier_test.go).
const (
	testNodeName              = "test-node"
	testNodeIP                = "192.168.0.2"
	testNodeIPAlt             = "192.168.1.2"
	testExternalIP            = "192.168.99.11"
	testNodeIPv6              = "2001:db8::1"
	testNodeIPv6Alt           = "2001:db8:1::2"
	testExternalClient        = "203.0.113.2"
	testExternalClientBlocked = "203.0.113.130"
)

// defaultNodePortAddrs is what upstream's NewFakeProxier selects: --nodeport-addresses
// testNodeIP/32 and testNodeIPv6/128.
var defaultNodePortAddrs = []netip.Addr{netip.MustParseAddr(testNodeIP), netip.MustParseAddr(testNodeIPv6)}

// via is how kpr arrives at the reference's output for one lookup.
type via int

const (
	viaBackends      via = iota // translated to one of the frontend's backends
	viaRefused                  // frontend with no backends, NoBackends == Reject
	viaWildcard                 // ClusterIP known, no frontend for the port/protocol: refused by the wildcard
	viaUnreachable              // frontend with no backends, NoBackends == Unreachable
	viaUnallocated              // socket scope: no frontend has the address, inside the Service CIDR
	viaNotAFrontend             // no frontend of the scope has the address: untouched
	viaSourceBlocked            // the source is outside the frontend's LoadBalancerSourceRanges
)

func (v via) String() string {
	return [...]string{"backends", "refused (no backends, Reject)", "refused (ClusterIP wildcard, port/protocol not served)",
		"unreachable (no backends, Unreachable)", "unreachable (unallocated address in the Service CIDR)",
		"not a frontend (untouched)", "blocked (source outside LoadBalancerSourceRanges)"}[v]
}

// verdictOf is the reference table's output for v ("" for a packet kube-proxy leaves alone).
func verdictOf(v via) string {
	switch v {
	case viaRefused, viaWildcard:
		return "REJECT"
	case viaUnreachable, viaUnallocated, viaSourceBlocked:
		return "DROP"
	case viaNotAFrontend:
		return ""
	}
	return "(backends)"
}

// from is where a row's traffic comes from.
type from int

const (
	fromPod from = iota
	fromNode
	fromExternal
)

func (f from) String() string { return [...]string{"pod", "node", "external"}[f] }

func (f from) scope() Scope {
	if f == fromExternal {
		return ScopeExternal
	}
	return ScopeSocket
}

// refWorld is the Services and EndpointSlices kube-proxy had at the time a row was checked,
// and the node's NodePort addresses (nil: defaultNodePortAddrs).
type refWorld struct {
	services      []*v1.Service
	slices        []*discovery.EndpointSlice
	nodePortAddrs []netip.Addr
}

// frontends is every frontend of the world, each Service given its own slices. It also checks
// what holds for every Service: no problems, Frontends is the socket-scope ClusterIP part of
// AllFrontends, and socket-scope frontends never masquerade.
func (w refWorld) frontends(t *testing.T) []Frontend {
	t.Helper()
	node := Node{Name: testNodeName}
	addrs := w.nodePortAddrs
	if addrs == nil {
		addrs = defaultNodePortAddrs
	}
	var out []Frontend
	for _, svc := range w.services {
		var own []*discovery.EndpointSlice
		for _, s := range w.slices {
			if s.Namespace == svc.Namespace && s.Labels[discovery.LabelServiceName] == svc.Name {
				own = append(own, s)
			}
		}
		eps := ServiceEndpoints(own, node.Name)
		_, fes, problems := AllFrontends(svc, eps, node, addrs, Options{ExternalClusterIP: true})
		if len(problems) > 0 {
			t.Errorf("AllFrontends(%s/%s): problems %v", svc.Namespace, svc.Name, problems)
		}
		var socketClusterIP []Frontend
		for _, f := range fes {
			if f.Scope == ScopeSocket && f.Type == ClusterIP {
				socketClusterIP = append(socketClusterIP, f)
			}
			if f.Scope == ScopeSocket && !f.PreserveClientIP {
				t.Errorf("AllFrontends(%s/%s): socket-scope frontend without PreserveClientIP: %s", svc.Namespace, svc.Name, fmtFrontend(f))
			}
		}
		if legacy := Frontends(svc, eps, node); !reflect.DeepEqual(legacy, socketClusterIP) {
			t.Errorf("Frontends(%s/%s) is not the socket-scope ClusterIP part of AllFrontends:%s\nwant:%s",
				svc.Namespace, svc.Name, fmtFrontends(legacy), fmtFrontends(socketClusterIP))
		}
		out = append(out, fes...)
	}
	return out
}

// upstreamServiceCIDR is the Service CIDR of the upstream tests, as kpr's agent would program it.
var upstreamServiceCIDR = netip.MustParsePrefix("172.30.0.0/16")

// deliver is what the datapath does in scope with a connection from src to dst:port/proto,
// given the frontends (and, in the socket scope, the Service CIDR upstreamServiceCIDR). f is
// the frontend found, if any.
func deliver(fes []Frontend, scope Scope, src, dst netip.Addr, port uint16, proto v1.Protocol) (v via, f *Frontend, err error) {
	var match []*Frontend
	owned := false
	for i := range fes {
		fe := &fes[i]
		if fe.Scope != scope || fe.Addr != dst {
			continue
		}
		owned = owned || fe.Type.OwnsAddress()
		if fe.Port == port && fe.Protocol == proto {
			match = append(match, fe)
		}
	}
	switch {
	case len(match) > 1:
		return 0, nil, fmt.Errorf("%d frontends share the key %s/%s %s", len(match), netip.AddrPortFrom(dst, port), proto, scope)
	case len(match) == 1:
		f = match[0]
		if len(f.LoadBalancerSourceRanges) > 0 && !slices.ContainsFunc(f.LoadBalancerSourceRanges, func(p netip.Prefix) bool { return p.Contains(src) }) {
			return viaSourceBlocked, f, nil
		}
		switch {
		case len(f.Backends) > 0:
			return viaBackends, f, nil
		case f.NoBackends == Unreachable:
			return viaUnreachable, f, nil
		}
		return viaRefused, f, nil
	case owned:
		return viaWildcard, nil, nil
	case scope == ScopeSocket && upstreamServiceCIDR.Contains(dst):
		return viaUnallocated, nil, nil
	}
	return viaNotAFrontend, nil, nil
}

// refCase is one row of the reference table, with the objects behind it.
type refCase struct {
	test  string // upstream test function (the table's "test" column)
	step  string // upstream sub-test or step ("" if none)
	row   string // the table's "name" column
	world refWorld
	proto v1.Protocol
	from  from
	src   string // the source address
	dest  string
	port  uint16
	// output as in the table: "ip:port, ip:port", "REJECT", "DROP" or "" (untouched).
	output string
	masq   bool
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

// TestLoadBalancer: a LoadBalancer Service with two load-balancer IPs and source ranges (one
// with blanks around it, which kube-proxy trims).
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

// TestNodePorts: a NodePort Service, single-stack IPv4 or IPv6. multiple is the sub-tests with
// --nodeport-addresses covering the alternate node IPs as well.
func worldNodePorts(ipv6, multiple bool) refWorld {
	svcIP, ep1, ep2, at := "172.30.0.41", "10.180.0.1", "10.180.2.1", discovery.AddressTypeIPv4
	if ipv6 {
		svcIP, ep1, ep2, at = "fd00:172:30::41", "fd00:10:180::1", "fd00:10:180::2:1", discovery.AddressTypeIPv6
	}
	w := refWorld{
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
	if multiple {
		// 192.168.0.0/24, 192.168.1.0/24 and 2001:db8::/64 (and 2001:db8:1::2/128 in the IPv6
		// sub-test) among the fake node's addresses.
		w.nodePortAddrs = []netip.Addr{netip.MustParseAddr(testNodeIP), netip.MustParseAddr(testNodeIPAlt), netip.MustParseAddr(testNodeIPv6)}
		if ipv6 {
			w.nodePortAddrs = append(w.nodePortAddrs, netip.MustParseAddr(testNodeIPv6Alt))
		}
	}
	return w
}

// TestExternalTrafficPolicyLocal / TestExternalTrafficPolicyCluster: one local and one remote
// endpoint behind a ClusterIP, an external IP, a load-balancer IP and a NodePort.
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

// flow is one row's traffic, before the world and test are attached.
type flow struct {
	row    string
	from   from
	src    string
	dest   string
	port   uint16
	output string
	masq   bool
	via    via
}

// Source addresses of the upstream tests.
const (
	podIP4  = "10.0.0.2"
	podIP6  = "fd00:10::2"
	extIP6  = "2600:5200::1"
	ipBoth1 = "10.180.0.1:80, 10.180.2.1:80" // TestNodePorts and TestExternalTrafficPolicy*, IPv4
)

func referenceCases() []refCase {
	const tcp, udp, sctp = v1.ProtocolTCP, v1.ProtocolUDP, v1.ProtocolSCTP
	var cases []refCase
	add := func(test, step string, w refWorld, proto v1.Protocol, flows ...flow) {
		for _, f := range flows {
			cases = append(cases, refCase{test: test, step: step, row: f.row, world: w, proto: proto, from: f.from, src: f.src,
				dest: f.dest, port: f.port, output: f.output, masq: f.masq, via: f.via})
		}
	}

	// TestNoEndpointsReject: every address of the Service refuses, from pods and from outside.
	add("TestNoEndpointsReject", "", worldNoEndpointsReject(), tcp,
		flow{"pod to cluster IP with no endpoints", fromPod, podIP4, "172.30.0.41", 80, "REJECT", false, viaRefused},
		flow{"external to external IP with no endpoints", fromExternal, testExternalClient, testExternalIP, 80, "REJECT", false, viaRefused},
		flow{"pod to NodePort with no endpoints", fromPod, podIP4, testNodeIP, 3001, "REJECT", false, viaRefused},
		flow{"external to NodePort with no endpoints", fromExternal, testExternalClient, testNodeIP, 3001, "REJECT", false, viaRefused},
		flow{"pod to LoadBalancer IP with no endpoints", fromPod, podIP4, "1.2.3.4", 80, "REJECT", false, viaRefused},
		flow{"external to LoadBalancer IP with no endpoints", fromExternal, testExternalClient, "1.2.3.4", 80, "REJECT", false, viaRefused},
	)

	// TestClusterIPGeneral
	g := worldClusterIPGeneral()
	const pod = "10.180.0.2"
	add("TestClusterIPGeneral", "", g, tcp,
		flow{"simple clusterIP", fromPod, pod, "172.30.0.41", 80, "10.180.0.1:80", false, viaBackends},
		// The source is the endpoint itself (masq true upstream).
		flow{"hairpin to cluster IP", fromPod, "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", true, viaBackends},
		flow{"clusterIP with multiple endpoints", fromPod, pod, "172.30.0.42", 80, "10.180.0.1:80, 10.180.2.1:80", false, viaBackends},
		flow{"clusterIP with TargetPort", fromPod, pod, "172.30.0.42", 443, "10.180.0.1:8443, 10.180.2.1:8443", false, viaBackends},
		flow{"clusterIP with TCP, UDP, and SCTP on same port (TCP)", fromPod, pod, "172.30.0.42", 53, "10.180.0.1:5353, 10.180.2.1:5353", false, viaBackends},
		flow{"svc1 does not accept svc2's ports", fromPod, pod, "172.30.0.41", 443, "REJECT", false, viaWildcard},
		flow{"packet to unallocated cluster ip", fromPod, pod, "172.30.0.50", 80, "DROP", false, viaUnallocated},
	)
	add("TestClusterIPGeneral", "", g, udp,
		// Upstream names this UDP row "(TCP)" too; the protocol column is what counts.
		flow{"clusterIP with TCP, UDP, and SCTP on same port (TCP)", fromPod, pod, "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", false, viaBackends},
		flow{"TCP-only port does not match UDP traffic", fromPod, pod, "172.30.0.42", 80, "REJECT", false, viaWildcard},
	)
	add("TestClusterIPGeneral", "", g, sctp,
		flow{"clusterIP with TCP, UDP, and SCTP on same port (SCTP)", fromPod, pod, "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", false, viaBackends},
	)

	// TestLoadBalancer: source ranges 192.168.0.0/24 and 203.0.113.0/25 guard both LB IPs in
	// both scopes; the node's address is among them, so the LB IPs themselves are allowed too.
	// The NodePort ignores them.
	const lbEP = "10.180.0.1:80"
	add("TestLoadBalancer", "", worldLoadBalancer(), tcp,
		flow{"pod to cluster IP", fromPod, podIP4, "172.30.0.41", 80, lbEP, false, viaBackends},
		flow{"external to nodePort", fromExternal, testExternalClient, testNodeIP, 3001, lbEP, true, viaBackends},
		flow{"nodePort bypasses LoadBalancerSourceRanges", fromExternal, testExternalClientBlocked, testNodeIP, 3001, lbEP, true, viaBackends},
		flow{"accepted external to LB1", fromExternal, testExternalClient, "1.2.3.4", 80, lbEP, true, viaBackends},
		flow{"accepted external to LB2", fromExternal, testExternalClient, "5.6.7.8", 80, lbEP, true, viaBackends},
		flow{"blocked external to LB1", fromExternal, testExternalClientBlocked, "1.2.3.4", 80, "DROP", false, viaSourceBlocked},
		flow{"blocked external to LB2", fromExternal, testExternalClientBlocked, "5.6.7.8", 80, "DROP", false, viaSourceBlocked},
		flow{"pod to LB1 (blocked by LoadBalancerSourceRanges)", fromPod, podIP4, "1.2.3.4", 80, "DROP", false, viaSourceBlocked},
		flow{"pod to LB2 (blocked by LoadBalancerSourceRanges)", fromPod, podIP4, "5.6.7.8", 80, "DROP", false, viaSourceBlocked},
		flow{"node to LB1 (allowed by LoadBalancerSourceRanges)", fromNode, testNodeIP, "1.2.3.4", 80, lbEP, true, viaBackends},
		flow{"node to LB2 (allowed by LoadBalancerSourceRanges)", fromNode, testNodeIP, "5.6.7.8", 80, lbEP, true, viaBackends},
		flow{"same node to LB1, SNATted to LB1 (implicitly allowed)", fromNode, "1.2.3.4", "1.2.3.4", 80, lbEP, true, viaBackends},
		flow{"same node to LB2, SNATted to LB2 (implicitly allowed)", fromNode, "5.6.7.8", "5.6.7.8", 80, lbEP, true, viaBackends},
	)

	// TestNodePorts: four sub-tests, two address families, with and without the alternate
	// node IPs among the NodePort addresses.
	for _, st := range []struct {
		name           string
		ipv6, multiple bool
	}{{"ipv4", false, false}, {"ipv4, multiple nodeport-addresses", false, true}, {"ipv6", true, false}, {"ipv6, multiple nodeport-addresses", true, true}} {
		svcIP, podIP, extIP, nodeIP, altIP, out := "172.30.0.41", podIP4, testExternalClient, testNodeIP, testNodeIPAlt, ipBoth1
		if st.ipv6 {
			svcIP, podIP, extIP, nodeIP, altIP, out = "fd00:172:30::41", podIP6, extIP6, testNodeIPv6, testNodeIPv6Alt, "[fd00:10:180::1]:80, [fd00:10:180::2:1]:80"
		}
		secondary := flow{"secondary nodeIP ignores NodePorts", fromExternal, extIP, altIP, 3001, "", false, viaNotAFrontend}
		if st.multiple {
			secondary = flow{"external to nodePort on secondary IP", fromExternal, extIP, altIP, 3001, out, true, viaBackends}
		}
		add("TestNodePorts", st.name, worldNodePorts(st.ipv6, st.multiple), tcp,
			flow{"pod to cluster IP", fromPod, podIP, svcIP, 80, out, false, viaBackends},
			flow{"external to nodePort", fromExternal, extIP, nodeIP, 3001, out, true, viaBackends},
			flow{"node to nodePort", fromNode, nodeIP, nodeIP, 3001, out, true, viaBackends},
			secondary,
		)
	}

	// TestExternalTrafficPolicyLocal: local clients reach every endpoint of every address;
	// external clients only the local endpoint, unmasqueraded.
	const localEP = "10.180.2.1:80"
	add("TestExternalTrafficPolicyLocal", "", worldExternalTrafficPolicy(v1.ServiceExternalTrafficPolicyLocal), tcp,
		flow{"pod to cluster IP hits both endpoints, unmasqueraded", fromPod, podIP4, "172.30.0.41", 80, ipBoth1, false, viaBackends},
		flow{"pod to external IP hits both endpoints, unmasqueraded", fromPod, podIP4, testExternalIP, 80, ipBoth1, false, viaBackends},
		flow{"external to external IP hits only local endpoint, unmasqueraded", fromExternal, testExternalClient, testExternalIP, 80, localEP, false, viaBackends},
		flow{"pod to LB IP hits only both endpoints, unmasqueraded", fromPod, podIP4, "1.2.3.4", 80, ipBoth1, false, viaBackends},
		flow{"external to LB IP hits only local endpoint, unmasqueraded", fromExternal, testExternalClient, "1.2.3.4", 80, localEP, false, viaBackends},
		flow{"pod to NodePort hits both endpoints, unmasqueraded", fromPod, podIP4, testNodeIP, 3001, ipBoth1, false, viaBackends},
		flow{"external to NodePort hits only local endpoint, unmasqueraded", fromExternal, testExternalClient, testNodeIP, 3001, localEP, false, viaBackends},
	)
	// TestExternalTrafficPolicyCluster: everyone reaches both endpoints; external clients are
	// masqueraded.
	add("TestExternalTrafficPolicyCluster", "", worldExternalTrafficPolicy(v1.ServiceExternalTrafficPolicyCluster), tcp,
		flow{"pod to cluster IP hits both endpoints, unmasqueraded", fromPod, podIP4, "172.30.0.41", 80, ipBoth1, false, viaBackends},
		flow{"pod to external IP hits both endpoints, masqueraded", fromPod, podIP4, testExternalIP, 80, ipBoth1, true, viaBackends},
		flow{"external to external IP hits both endpoints, masqueraded", fromExternal, testExternalClient, testExternalIP, 80, ipBoth1, true, viaBackends},
		flow{"pod to LB IP hits both endpoints, masqueraded", fromPod, podIP4, "1.2.3.4", 80, ipBoth1, true, viaBackends},
		flow{"external to LB IP hits both endpoints, masqueraded", fromExternal, testExternalClient, "1.2.3.4", 80, ipBoth1, true, viaBackends},
		flow{"pod to NodePort hits both endpoints, masqueraded", fromPod, podIP4, testNodeIP, 3001, ipBoth1, true, viaBackends},
		flow{"external to NodePort hits both endpoints, masqueraded", fromExternal, testExternalClient, testNodeIP, 3001, ipBoth1, true, viaBackends},
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
		add("TestInternalTrafficPolicy", st.name, worldInternalTrafficPolicy(st.itp, true, st.eps...), tcp,
			flow{st.row, fromPod, podIP4, "172.30.1.1", 80, st.output, false, st.via})
		add("TestInternalTrafficPolicy", st.name+" (slice deleted)", worldInternalTrafficPolicy(st.itp, false), tcp,
			flow{"endpoints deleted", fromPod, podIP4, "172.30.1.1", 80, "REJECT", false, viaRefused})
	}

	// TestTerminatingEndpointsTrafficPolicyLocal: four steps, each followed by the slice's
	// deletion. externalTrafficPolicy Local applies to the LB IP from outside, not to the
	// ClusterIP.
	local := v1.ServiceExternalTrafficPolicyLocal
	for _, st := range []struct {
		name  string
		eps   []discovery.Endpoint
		flows []flow
	}{
		{"ready endpoints exist", []discovery.Endpoint{
			epCond("10.0.1.1", testNodeName, true, true, false),
			epCond("10.0.1.2", testNodeName, true, true, false),
			epCond("10.0.1.3", testNodeName, false, true, true),
			epCond("10.0.1.4", testNodeName, false, false, true),
			epCond("10.0.1.5", "node-1", true, true, false),
		}, []flow{
			{"pod to clusterIP", fromPod, podIP4, "172.30.1.1", 80, "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", false, viaBackends},
			{"external to LB", fromExternal, testExternalClient, "1.2.3.4", 80, "10.0.1.1:80, 10.0.1.2:80", false, viaBackends},
		}},
		{"only terminating endpoints exist", []discovery.Endpoint{
			epCond("10.0.1.2", testNodeName, false, true, true),
			epCond("10.0.1.3", testNodeName, false, true, true),
			epCond("10.0.1.4", testNodeName, false, false, true),
			epCond("10.0.1.5", "node-1", true, true, false),
		}, []flow{
			{"pod to clusterIP", fromPod, podIP4, "172.30.1.1", 80, "10.0.1.5:80", false, viaBackends},
			{"external to LB", fromExternal, testExternalClient, "1.2.3.4", 80, "10.0.1.2:80, 10.0.1.3:80", false, viaBackends},
		}},
		{"terminating endpoints on remote node", []discovery.Endpoint{
			epCond("10.0.1.5", "node-1", false, true, true),
		}, []flow{
			{"pod to clusterIP", fromPod, podIP4, "172.30.1.1", 80, "10.0.1.5:80", false, viaBackends},
			{"external to LB, no locally-usable endpoints", fromExternal, testExternalClient, "1.2.3.4", 80, "DROP", false, viaUnreachable},
		}},
		{"no usable endpoints on any node", []discovery.Endpoint{
			epCond("10.0.1.5", testNodeName, false, false, true),
			epCond("10.0.1.5", "node-1", false, false, true),
		}, []flow{
			{"pod to clusterIP, no usable endpoints", fromPod, podIP4, "172.30.1.1", 80, "REJECT", false, viaRefused},
			{"external to LB, no usable endpoints", fromExternal, testExternalClient, "1.2.3.4", 80, "REJECT", false, viaRefused},
		}},
	} {
		add("TestTerminatingEndpointsTrafficPolicyLocal", st.name, worldTerminating(local, st.eps...), tcp, st.flows...)
		add("TestTerminatingEndpointsTrafficPolicyLocal", st.name+" (slice deleted)", worldTerminating(local), tcp,
			flow{"pod to clusterIP after endpoints deleted", fromPod, podIP4, "172.30.1.1", 80, "REJECT", false, viaRefused},
			flow{"external to LB after endpoints deleted", fromExternal, testExternalClient, "1.2.3.4", 80, "REJECT", false, viaRefused})
	}

	// TestTerminatingEndpointsTrafficPolicyCluster: the same steps with other endpoints; the LB
	// IP from outside gets what the ClusterIP gets, masqueraded.
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
		add("TestTerminatingEndpointsTrafficPolicyCluster", st.name, worldTerminating(cluster, st.eps...), tcp,
			flow{"pod to clusterIP", fromPod, podIP4, "172.30.1.1", 80, st.output, false, st.via},
			flow{"external to LB", fromExternal, testExternalClient, "1.2.3.4", 80, st.output, st.via == viaBackends, st.via})
		add("TestTerminatingEndpointsTrafficPolicyCluster", st.name+" (slice deleted)", worldTerminating(cluster), tcp,
			flow{"pod to clusterIP after endpoints deleted", fromPod, podIP4, "172.30.1.1", 80, "REJECT", false, viaRefused},
			flow{"external to LB after endpoints deleted", fromExternal, testExternalClient, "1.2.3.4", 80, "REJECT", false, viaRefused})
	}

	// TestInternalExternalMasquerade: pod, node and external clients to each address of svc1
	// (plain), svc2 (eTP:Local) and svc3 (iTP:Local). Local clients are short-circuited to
	// every endpoint on NodePorts and LB IPs; iTP applies to ClusterIPs from anywhere, eTP to
	// NodePorts and LB IPs from outside only.
	const (
		both1, both2, both3 = "10.180.0.1:80, 10.180.1.1:80", "10.180.0.2:80, 10.180.1.2:80", "10.180.0.3:80, 10.180.1.3:80"
	)
	add("TestInternalExternalMasquerade", "", worldInternalExternalMasquerade(), tcp,
		flow{"pod to ClusterIP", fromPod, podIP4, "172.30.0.41", 80, both1, false, viaBackends},
		flow{"pod to NodePort", fromPod, podIP4, testNodeIP, 3001, both1, true, viaBackends},
		flow{"pod to LB", fromPod, podIP4, "1.2.3.4", 80, both1, true, viaBackends},
		flow{"node to ClusterIP", fromNode, testNodeIP, "172.30.0.41", 80, both1, true, viaBackends},
		flow{"node to NodePort", fromNode, testNodeIP, testNodeIP, 3001, both1, true, viaBackends},
		flow{"node to LB", fromNode, testNodeIP, "1.2.3.4", 80, both1, true, viaBackends},
		flow{"external to ClusterIP", fromExternal, testExternalClient, "172.30.0.41", 80, both1, true, viaBackends},
		flow{"external to NodePort", fromExternal, testExternalClient, testNodeIP, 3001, both1, true, viaBackends},
		flow{"external to LB", fromExternal, testExternalClient, "1.2.3.4", 80, both1, true, viaBackends},

		flow{"pod to ClusterIP with eTP:Local", fromPod, podIP4, "172.30.0.42", 80, both2, false, viaBackends},
		flow{"pod to NodePort with eTP:Local", fromPod, podIP4, testNodeIP, 3002, both2, false, viaBackends},
		flow{"pod to LB with eTP:Local", fromPod, podIP4, "5.6.7.8", 80, both2, false, viaBackends},
		flow{"node to ClusterIP with eTP:Local", fromNode, testNodeIP, "172.30.0.42", 80, both2, true, viaBackends},
		// Upstream's row targets port 3001, svc1's NodePort, not svc2's 3002, so it checks
		// the same as "node to NodePort" (its comment says as much). Reproduced as written;
		// TestAllFrontendsShortCircuit checks svc2's NodePort from the node.
		flow{"node to NodePort with eTP:Local", fromNode, testNodeIP, testNodeIP, 3001, both1, true, viaBackends},
		flow{"node to LB with eTP:Local", fromNode, testNodeIP, "5.6.7.8", 80, both2, true, viaBackends},
		flow{"external to ClusterIP with eTP:Local", fromExternal, testExternalClient, "172.30.0.42", 80, both2, true, viaBackends},
		flow{"external to NodePort with eTP:Local", fromExternal, testExternalClient, testNodeIP, 3002, "10.180.0.2:80", false, viaBackends},
		flow{"external to LB with eTP:Local", fromExternal, testExternalClient, "5.6.7.8", 80, "10.180.0.2:80", false, viaBackends},

		flow{"pod to ClusterIP with iTP:Local", fromPod, podIP4, "172.30.0.43", 80, "10.180.0.3:80", false, viaBackends},
		flow{"pod to NodePort with iTP:Local", fromPod, podIP4, testNodeIP, 3003, both3, true, viaBackends},
		flow{"pod to LB with iTP:Local", fromPod, podIP4, "9.10.11.12", 80, both3, true, viaBackends},
		flow{"node to ClusterIP with iTP:Local", fromNode, testNodeIP, "172.30.0.43", 80, "10.180.0.3:80", true, viaBackends},
		flow{"node to NodePort with iTP:Local", fromNode, testNodeIP, testNodeIP, 3003, both3, true, viaBackends},
		flow{"node to LB with iTP:Local", fromNode, testNodeIP, "9.10.11.12", 80, both3, true, viaBackends},
		flow{"external to ClusterIP with iTP:Local", fromExternal, testExternalClient, "172.30.0.43", 80, "10.180.0.3:80", true, viaBackends},
		flow{"external to NodePort with iTP:Local", fromExternal, testExternalClient, testNodeIP, 3003, both3, true, viaBackends},
		flow{"external to LB with iTP:Local", fromExternal, testExternalClient, "9.10.11.12", 80, both3, true, viaBackends},
	)
	return cases
}

func TestReference(t *testing.T) {
	for _, tc := range referenceCases() {
		t.Run(tc.id(), func(t *testing.T) {
			src, err1 := netip.ParseAddr(tc.src)
			dst, err2 := netip.ParseAddr(tc.dest)
			if err := errors.Join(err1, err2); err != nil {
				t.Fatalf("%s: bad address in test table: %v", tc.id(), err)
			}
			// The table's own consistency: verdict rows say how kpr gets there, backend rows
			// do not.
			var want []netip.AddrPort
			switch tc.output {
			case "REJECT", "DROP", "":
				if verdictOf(tc.via) != tc.output {
					t.Fatalf("%s: test table error: output %q with via %s", tc.id(), tc.output, tc.via)
				}
			default:
				if tc.via != viaBackends {
					t.Fatalf("%s: test table error: backend output with via %s", tc.id(), tc.via)
				}
				want = mustAddrPorts(t, strings.Split(tc.output, ",")...)
			}

			fes := tc.world.frontends(t)
			scope := tc.from.scope()
			got, fe, err := deliver(fes, scope, src, dst, tc.port, tc.proto)
			if err != nil {
				t.Fatalf("%s: %v; frontends:%s", tc.id(), err, fmtFrontends(fes))
			}
			what := fmt.Sprintf("%s scope, %s %s -> %s/%s", scope, tc.from, src, netip.AddrPortFrom(dst, tc.port), tc.proto)
			if got != tc.via {
				t.Fatalf("%s: %s: got %s (%q), want %s (%q); frontends:%s",
					tc.id(), what, got, verdictOf(got), tc.via, tc.output, fmtFrontends(fes))
			}
			if got != viaBackends {
				return
			}
			if !slices.Equal(sortedCopy(fe.Backends), sortedCopy(want)) {
				t.Errorf("%s: %s: backends %s, want %s", tc.id(), what, fmtAddrPorts(sortedCopy(fe.Backends)), fmtAddrPorts(want))
			}
			// Socket-scope frontends always preserve the client's address (checked for every
			// frontend by refWorld.frontends); masq applies to the external scope.
			if scope == ScopeExternal && fe.PreserveClientIP == tc.masq {
				t.Errorf("%s: %s: PreserveClientIP %v, want %v (masq %v)", tc.id(), what, fe.PreserveClientIP, !tc.masq, tc.masq)
			}
		})
	}
}

// ---- Coverage of the reference table. ----

const referenceTable = "testdata/kube_proxy_nftables_packet_flows.tsv"

// referenceRows is how many rows the table has; it guards the reading below against silently
// matching nothing.
const referenceRows = 100

type tsvRow struct {
	line                                             int
	test, name, proto, source, dest, port, out, masq string
	raw                                              string
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
			dest: cols[4], port: cols[5], out: cols[6], masq: cols[7], raw: sc.Text()})
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return rows
}

// upstreamSymbols are the values of the names the table uses, in the upstream test (and
// sub-test) a case comes from: the file's constants and the test's local variables.
func upstreamSymbols(test, step string) map[string]string {
	syms := map[string]string{
		"testNodeIP": testNodeIP, "testNodeIPAlt": testNodeIPAlt, "testExternalIP": testExternalIP,
		"testNodeIPv6": testNodeIPv6, "testNodeIPv6Alt": testNodeIPv6Alt,
		"testExternalClient": testExternalClient, "testExternalClientBlocked": testExternalClientBlocked,
	}
	set := func(kv ...string) {
		for i := 0; i < len(kv); i += 2 {
			syms[kv[i]] = kv[i+1]
		}
	}
	switch test {
	case "TestNoEndpointsReject":
		set("svcIP", "172.30.0.41", "svcPort", "80", "svcNodePort", "3001", "svcExternalIPs", testExternalIP, "svcLBIP", "1.2.3.4")
	case "TestLoadBalancer":
		set("svcIP", "172.30.0.41", "svcPort", "80", "svcNodePort", "3001", "svcLBIP1", "1.2.3.4", "svcLBIP2", "5.6.7.8", "epIP", "10.180.0.1")
	case "TestExternalTrafficPolicyLocal", "TestExternalTrafficPolicyCluster":
		set("svcIP", "172.30.0.41", "svcPort", "80", "svcNodePort", "3001", "svcExternalIPs", testExternalIP, "svcLBIP", "1.2.3.4",
			"epIP1", "10.180.0.1", "epIP2", "10.180.2.1")
	case "TestNodePorts":
		if strings.HasPrefix(step, "ipv6") {
			set("svcIP", "fd00:172:30::41", "podIP", podIP6, "externalClientIP", extIP6, "nodeIP", testNodeIPv6, "altNodeIP", testNodeIPv6Alt,
				"output", "[fd00:10:180::1]:80, [fd00:10:180::2:1]:80")
		} else {
			set("svcIP", "172.30.0.41", "podIP", podIP4, "externalClientIP", testExternalClient, "nodeIP", testNodeIP, "altNodeIP", testNodeIPAlt,
				"output", ipBoth1)
		}
	}
	return syms
}

// resolve evaluates one column: a Go string literal, an integer, a symbol, or
// fmt.Sprintf("...", symbols...).
func resolve(col string, syms map[string]string) (string, error) {
	if s, err := strconv.Unquote(col); err == nil {
		return s, nil
	}
	if _, err := strconv.Atoi(col); err == nil {
		return col, nil
	}
	if rest, ok := strings.CutPrefix(col, "fmt.Sprintf("); ok {
		rest, ok = strings.CutSuffix(rest, ")")
		format, err := strconv.QuotedPrefix(rest)
		if !ok || err != nil {
			return "", fmt.Errorf("cannot parse %s", col)
		}
		f, _ := strconv.Unquote(format)
		var args []any
		for _, a := range strings.Split(strings.TrimPrefix(rest[len(format):], ", "), ", ") {
			v, err := resolve(a, syms)
			if err != nil {
				return "", err
			}
			args = append(args, v)
		}
		return fmt.Sprintf(strings.ReplaceAll(f, "%d", "%s"), args...), nil
	}
	if v, ok := syms[col]; ok {
		return v, nil
	}
	return "", fmt.Errorf("unknown symbol %s", col)
}

// sourceKind says where the table's source comes from: external clients by name, the node by
// its address or a load-balancer IP bound on it ("same node to LB"), pods by a literal address
// in the upstream pod CIDR (10.0.0.0/8) or podIP.
func sourceKind(col string) (from, error) {
	switch col {
	case "testExternalClient", "testExternalClientBlocked", "externalClientIP":
		return fromExternal, nil
	case "testNodeIP", "nodeIP", "svcLBIP1", "svcLBIP2":
		return fromNode, nil
	case "podIP":
		return fromPod, nil
	}
	if s, err := strconv.Unquote(col); err == nil {
		if a, err := netip.ParseAddr(s); err == nil && netip.MustParsePrefix("10.0.0.0/8").Contains(a) {
			return fromPod, nil
		}
	}
	return 0, fmt.Errorf("unknown source %s", col)
}

// matches says whether case c reproduces row r: the same test, name and protocol, and, with
// the symbols of c's test resolved, the same source (and kind of source), destination, port,
// output and masq.
func (r tsvRow) matches(c refCase) (bool, error) {
	if r.test != c.test || r.name != c.row || v1.Protocol(strings.TrimPrefix(r.proto, "v1.Protocol")) != c.proto {
		return false, nil
	}
	syms := upstreamSymbols(c.test, c.step)
	var got [4]string
	for i, col := range []string{r.source, r.dest, r.port, r.out} {
		v, err := resolve(col, syms)
		if err != nil {
			return false, fmt.Errorf("%s:%d: %w", referenceTable, r.line, err)
		}
		got[i] = v
	}
	kind, err := sourceKind(r.source)
	if err != nil {
		return false, fmt.Errorf("%s:%d: %w", referenceTable, r.line, err)
	}
	masq, err := strconv.ParseBool(r.masq)
	if err != nil {
		return false, fmt.Errorf("%s:%d: masq %q: %w", referenceTable, r.line, r.masq, err)
	}
	return got == [4]string{c.src, c.dest, strconv.Itoa(int(c.port)), c.output} && kind == c.from && masq == c.masq, nil
}

// TestReferenceTableCoverage checks that every row of the reference table has a case (as many
// as the table repeats it), and that every case stands for a row of the table.
func TestReferenceTableCoverage(t *testing.T) {
	rows := readReferenceTable(t)
	cases := referenceCases()
	if len(rows) != referenceRows {
		t.Errorf("%s has %d rows, want %d", referenceTable, len(rows), referenceRows)
	}

	matched := make([]bool, len(cases))
	want := map[string]int{} // identical rows: how many times the table has each
	for _, r := range rows {
		want[r.raw]++
	}
	for _, r := range rows {
		if want[r.raw] == 0 {
			continue // already checked with an identical row
		}
		n := 0
		for i, c := range cases {
			ok, err := r.matches(c)
			if err != nil {
				t.Fatal(err)
			}
			if ok {
				n++
				matched[i] = true
			}
		}
		if n < want[r.raw] {
			t.Errorf("%s:%d (%s / %s, %s %s -> %s:%s -> %s): %d matching cases, want at least %d",
				referenceTable, r.line, r.test, r.name, r.proto, r.source, r.dest, r.port, r.out, n, want[r.raw])
		}
		want[r.raw] = 0
	}
	for i, c := range cases {
		if !matched[i] {
			t.Errorf("case %s (%s %s -> %s:%d -> %q) matches no row of %s", c.id(), c.from, c.src, c.dest, c.port, c.output, referenceTable)
		}
	}
}
