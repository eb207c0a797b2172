package lbstate

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
)

// Semantics of AllFrontends beyond the reference table: north-south frontends (NodePort,
// ExternalIP, LoadBalancer), both scopes, and what a Service may get wrong. Unless a case says
// otherwise the node is node-a with NodePort address 198.18.0.11, the Service default/web
// (ClusterIP 10.96.0.10, port http 80/TCP -> 8080) and the endpoints 10.244.1.1 on node-a and
// 10.244.2.1 on node-b.

const (
	nodeAddr4  = "198.18.0.11"
	nodeAddr6  = "fd6b:7072::11"
	extIP      = "192.0.2.50"
	lbIP       = "192.0.2.100"
	lbIP6      = "2001:db8:100::1"
	localEP    = "10.244.1.1:8080"
	remoteEP   = "10.244.2.1:8080"
	bothEPs    = localEP + " " + remoteEP
	nodePort80 = 30080
)

// withNodePort gives port http a NodePort.
func withNodePort(p v1.ServicePort) v1.ServicePort { p.NodePort = nodePort80; return p }

// lbWeb is default/web as a LoadBalancer Service with NodePort 30080, external IP extIP and
// load-balancer IP lbIP; mutate, if not nil, changes the rest.
func lbWeb(mutate func(*v1.Service)) *v1.Service {
	return web(func(s *v1.Service) {
		s.Spec.Type = v1.ServiceTypeLoadBalancer
		s.Spec.ExternalIPs = []string{extIP}
		s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: lbIP}}
		if mutate != nil {
			mutate(s)
		}
	}, withNodePort(httpPort()))
}

func etpLocal(s *v1.Service) {
	s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
	s.Spec.HealthCheckNodePort = 32000
}

// twoEndpoints is the usual slice: one endpoint on node-a (local), one on node-b.
func twoEndpoints() []*discovery.EndpointSlice {
	return []*discovery.EndpointSlice{webSlice("web-1", ep("10.244.1.1", "node-a"), ep("10.244.2.1", "node-b"))}
}

// line renders a frontend on one line: "<scope> <type> <key> -> <backends>|REJECT|UNREACHABLE",
// then "snat" if the client's address is not preserved, "from=<ranges>" and "affinity=<s>".
func line(f Frontend) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s %s ->", f.Scope, f.Type, f.FrontendKey)
	switch {
	case len(f.Backends) > 0:
		for _, be := range f.Backends {
			b.WriteString(" " + be.String())
		}
	case f.NoBackends == Unreachable:
		b.WriteString(" UNREACHABLE")
	default:
		b.WriteString(" REJECT")
	}
	switch {
	case f.DSR:
		b.WriteString(" dsr")
	case !f.PreserveClientIP:
		b.WriteString(" snat")
	}
	if len(f.LoadBalancerSourceRanges) > 0 {
		ss := make([]string, len(f.LoadBalancerSourceRanges))
		for i, p := range f.LoadBalancerSourceRanges {
			ss[i] = p.String()
		}
		b.WriteString(" from=" + strings.Join(ss, ","))
	}
	if f.AffinityTimeoutSec != 0 {
		fmt.Fprintf(&b, " affinity=%d", f.AffinityTimeoutSec)
	}
	return b.String()
}

// both is the socket- and external-scope lines of one frontend: the socket one with the
// backends sock, the external one with ext (and extras such as "snat" appended to ext).
func both(typ Type, key, sock, ext string) []string {
	return []string{
		fmt.Sprintf("socket %s %s -> %s", typ, key, sock),
		fmt.Sprintf("external %s %s -> %s", typ, key, ext),
	}
}

func lines(groups ...any) []string {
	var out []string
	for _, g := range groups {
		switch g := g.(type) {
		case string:
			out = append(out, g)
		case []string:
			out = append(out, g...)
		default:
			panic(fmt.Sprintf("lines: %T", g))
		}
	}
	return out
}

type nsCase struct {
	name      string
	svc       *v1.Service
	slices    []*discovery.EndpointSlice // nil: none
	nodeAddrs []string                   // nil: nodeAddr4
	opts      Options
	want      []string // line() of every frontend, in order
	problems  []string // Problem.String(), in order
}

func (tc nsCase) run(t *testing.T) (ServiceInfo, []Frontend) {
	t.Helper()
	addrStrs := tc.nodeAddrs
	if addrStrs == nil {
		addrStrs = []string{nodeAddr4}
	}
	var addrs []netip.Addr
	for _, s := range addrStrs {
		addrs = append(addrs, netip.MustParseAddr(s))
	}
	info, fes, problems := AllFrontends(tc.svc, ServiceEndpoints(tc.slices, nodeA.Name), nodeA, addrs, tc.opts)
	got := make([]string, len(fes))
	for i, f := range fes {
		got[i] = line(f)
		if f.Service != (ServicePortName{Namespace: tc.svc.Namespace, Name: tc.svc.Name, Port: f.Service.Port, Protocol: f.Protocol}) {
			t.Errorf("frontend %s: service %s", f.FrontendKey, f.Service)
		}
		if f.Scope == ScopeSocket && !f.PreserveClientIP {
			t.Errorf("socket-scope frontend %s without PreserveClientIP", f.FrontendKey)
		}
		if f.DSR && (f.Scope != ScopeExternal || f.Type == ClusterIP || f.PreserveClientIP) {
			t.Errorf("%s %s frontend %s with DSR (PreserveClientIP %v)", f.Scope, f.Type, f.FrontendKey, f.PreserveClientIP)
		}
		if f.Type != LoadBalancer && len(f.LoadBalancerSourceRanges) > 0 && !(tc.opts.NodePortSourceRanges && f.Type == NodePort) {
			t.Errorf("%s frontend %s with source ranges %v", f.Type, f.FrontendKey, f.LoadBalancerSourceRanges)
		}
	}
	if !slices.Equal(got, tc.want) {
		t.Errorf("frontends:\n\t%s\nwant:\n\t%s", strings.Join(got, "\n\t"), strings.Join(tc.want, "\n\t"))
	}
	gotProblems := make([]string, len(problems))
	for i, p := range problems {
		gotProblems[i] = p.String()
	}
	if !slices.Equal(gotProblems, tc.problems) {
		t.Errorf("problems:\n\t%s\nwant:\n\t%s", strings.Join(gotProblems, "\n\t"), strings.Join(tc.problems, "\n\t"))
	}
	return info, fes
}

func runNSCases(t *testing.T, cases []nsCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { tc.run(t) })
	}
}

var (
	cip80  = vip4 + ":80/tcp"
	ext80  = extIP + ":80/tcp"
	lb80   = lbIP + ":80/tcp"
	node80 = nodeAddr4 + ":30080/tcp"
)

func TestAllFrontendsTrafficPolicies(t *testing.T) {
	runNSCases(t, []nsCase{
		{
			name:   "eTP Cluster: every address in both scopes, all endpoints, external traffic masqueraded",
			svc:    lbWeb(nil),
			slices: twoEndpoints(),
			want: lines(
				"socket ClusterIP "+cip80+" -> "+bothEPs,
				both(ExternalIP, ext80, bothEPs, bothEPs+" snat"),
				both(LoadBalancer, lb80, bothEPs, bothEPs+" snat"),
				both(NodePort, node80, bothEPs, bothEPs+" snat"),
			),
		},
		{
			name:   "eTP Local: external traffic only to local endpoints, unmasqueraded; local sockets short-circuit to all",
			svc:    lbWeb(etpLocal),
			slices: twoEndpoints(),
			want: lines(
				"socket ClusterIP "+cip80+" -> "+bothEPs,
				both(ExternalIP, ext80, bothEPs, localEP),
				both(LoadBalancer, lb80, bothEPs, localEP),
				both(NodePort, node80, bothEPs, localEP),
			),
		},
		{
			name:   "eTP Local, no local endpoint: external traffic unreachable, local sockets still served",
			svc:    lbWeb(etpLocal),
			slices: []*discovery.EndpointSlice{webSlice("web-1", ep("10.244.2.1", "node-b"))},
			want: lines(
				"socket ClusterIP "+cip80+" -> "+remoteEP,
				both(ExternalIP, ext80, remoteEP, "UNREACHABLE"),
				both(LoadBalancer, lb80, remoteEP, "UNREACHABLE"),
				both(NodePort, node80, remoteEP, "UNREACHABLE"),
			),
		},
		{
			name:   "eTP Local, only a local terminating endpoint: external traffic falls back to it",
			svc:    lbWeb(etpLocal),
			slices: []*discovery.EndpointSlice{webSlice("web-1", epCond("10.244.1.1", "node-a", false, true, true), ep("10.244.2.1", "node-b"))},
			want: lines(
				"socket ClusterIP "+cip80+" -> "+remoteEP,
				both(ExternalIP, ext80, remoteEP, localEP),
				both(LoadBalancer, lb80, remoteEP, localEP),
				both(NodePort, node80, remoteEP, localEP),
			),
		},
		{
			name: "no endpoints at all: every frontend refuses",
			svc:  lbWeb(etpLocal),
			want: lines(
				"socket ClusterIP "+cip80+" -> REJECT",
				both(ExternalIP, ext80, "REJECT", "REJECT"),
				both(LoadBalancer, lb80, "REJECT", "REJECT"),
				both(NodePort, node80, "REJECT", "REJECT"),
			),
		},
		{
			name:   "iTP Local applies to the ClusterIP only; eTP Cluster traffic is masqueraded",
			svc:    lbWeb(itpLocal),
			slices: twoEndpoints(),
			want: lines(
				"socket ClusterIP "+cip80+" -> "+localEP,
				both(ExternalIP, ext80, bothEPs, bothEPs+" snat"),
				both(LoadBalancer, lb80, bothEPs, bothEPs+" snat"),
				both(NodePort, node80, bothEPs, bothEPs+" snat"),
			),
		},
		{
			name:   "iTP Local without local endpoints does not touch the other addresses",
			svc:    lbWeb(func(s *v1.Service) { itpLocal(s); etpLocal(s) }),
			slices: []*discovery.EndpointSlice{webSlice("web-1", ep("10.244.2.1", "node-b"))},
			want: lines(
				"socket ClusterIP "+cip80+" -> UNREACHABLE",
				both(ExternalIP, ext80, remoteEP, "UNREACHABLE"),
				both(LoadBalancer, lb80, remoteEP, "UNREACHABLE"),
				both(NodePort, node80, remoteEP, "UNREACHABLE"),
			),
		},
		{
			// kube-proxy's ExternallyAccessible: a ClusterIP Service with external IPs is, so
			// its externalTrafficPolicy counts.
			name: "externalIPs on a ClusterIP Service: eTP Local applies to them",
			svc: web(func(s *v1.Service) {
				s.Spec.ExternalIPs = []string{extIP}
				s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
			}),
			slices: twoEndpoints(),
			want: lines(
				"socket ClusterIP "+cip80+" -> "+bothEPs,
				both(ExternalIP, ext80, bothEPs, localEP),
			),
		},
		{
			name:   "session affinity on every frontend",
			svc:    lbWeb(func(s *v1.Service) { s.Spec.SessionAffinity = v1.ServiceAffinityClientIP }),
			slices: []*discovery.EndpointSlice{webSlice("web-1", ep("10.244.1.1", "node-a"))},
			want: lines(
				"socket ClusterIP "+cip80+" -> "+localEP+" affinity=10800",
				both(ExternalIP, ext80, localEP+" affinity=10800", localEP+" snat affinity=10800"),
				both(LoadBalancer, lb80, localEP+" affinity=10800", localEP+" snat affinity=10800"),
				both(NodePort, node80, localEP+" affinity=10800", localEP+" snat affinity=10800"),
			),
		},
		{
			name:   "ignored Service: nothing",
			svc:    lbWeb(func(s *v1.Service) { s.Labels = map[string]string{LabelServiceProxyName: "other"} }),
			slices: twoEndpoints(),
		},
	})
}

func TestAllFrontendsExternalClusterIP(t *testing.T) {
	runNSCases(t, []nsCase{
		{
			name:   "off (default): ClusterIPs in the socket scope only",
			svc:    web(nil),
			slices: twoEndpoints(),
			want:   []string{"socket ClusterIP " + cip80 + " -> " + bothEPs},
		},
		{
			name:   "on: also in the external scope, with the same backends, masqueraded",
			svc:    web(nil),
			slices: twoEndpoints(),
			opts:   Options{ExternalClusterIP: true},
			want:   both(ClusterIP, cip80, bothEPs, bothEPs+" snat"),
		},
		{
			name:   "on: iTP Local applies to external clients too",
			svc:    web(itpLocal),
			slices: twoEndpoints(),
			opts:   Options{ExternalClusterIP: true},
			want:   both(ClusterIP, cip80, localEP, localEP+" snat"),
		},
		{
			name:   "on: eTP Local does not apply to ClusterIPs",
			svc:    lbWeb(etpLocal),
			slices: twoEndpoints(),
			opts:   Options{ExternalClusterIP: true},
			want: lines(
				both(ClusterIP, cip80, bothEPs, bothEPs+" snat"),
				both(ExternalIP, ext80, bothEPs, localEP),
				both(LoadBalancer, lb80, bothEPs, localEP),
				both(NodePort, node80, bothEPs, localEP),
			),
		},
		{
			name:   "on: no usable local endpoint under iTP Local is unreachable from outside too",
			svc:    web(itpLocal),
			slices: []*discovery.EndpointSlice{webSlice("web-1", ep("10.244.2.1", "node-b"))},
			opts:   Options{ExternalClusterIP: true},
			want:   both(ClusterIP, cip80, "UNREACHABLE", "UNREACHABLE snat"),
		},
		{
			name: "on: dual-stack, both ClusterIPs",
			svc:  web(dualStack),
			slices: []*discovery.EndpointSlice{
				webSlice("web-v4", ep("10.244.1.1", "node-a")),
				webSlice6("web-v6", ep("fd6b:7072:244:1::1", "node-a")),
			},
			opts: Options{ExternalClusterIP: true},
			want: lines(
				both(ClusterIP, cip80, localEP, localEP+" snat"),
				both(ClusterIP, "["+vip6+"]:80/tcp", "[fd6b:7072:244:1::1]:8080", "[fd6b:7072:244:1::1]:8080 snat"),
			),
		},
	})
}

func TestAllFrontendsLoadBalancerIngress(t *testing.T) {
	ingress := func(ing ...v1.LoadBalancerIngress) func(*v1.Service) {
		return func(s *v1.Service) { s.Spec.ExternalIPs = nil; s.Status.LoadBalancer.Ingress = ing }
	}
	one := []*discovery.EndpointSlice{webSlice("web-1", ep("10.244.1.1", "node-a"))}
	runNSCases(t, []nsCase{
		{
			name: "ipMode Proxy is skipped; VIP and unset are served; hostname-only entries are not addresses",
			svc: lbWeb(ingress(
				v1.LoadBalancerIngress{IP: "192.0.2.101", IPMode: ptrTo(v1.LoadBalancerIPModeProxy)},
				v1.LoadBalancerIngress{IP: "192.0.2.102", IPMode: ptrTo(v1.LoadBalancerIPModeVIP)},
				v1.LoadBalancerIngress{IP: "192.0.2.103"},
				v1.LoadBalancerIngress{Hostname: "lb.example.com"},
				v1.LoadBalancerIngress{Hostname: "lb.example.com", IPMode: ptrTo(v1.LoadBalancerIPModeProxy)},
			)),
			slices: one,
			want: lines(
				"socket ClusterIP "+cip80+" -> "+localEP,
				both(LoadBalancer, "192.0.2.102:80/tcp", localEP, localEP+" snat"),
				both(LoadBalancer, "192.0.2.103:80/tcp", localEP, localEP+" snat"),
				both(NodePort, node80, localEP, localEP+" snat"),
			),
		},
		{
			name:   "ingress of a family the Service has no ClusterIP of is ignored",
			svc:    lbWeb(ingress(v1.LoadBalancerIngress{IP: lbIP6}, v1.LoadBalancerIngress{IP: lbIP})),
			slices: one,
			want: lines(
				"socket ClusterIP "+cip80+" -> "+localEP,
				both(LoadBalancer, lb80, localEP, localEP+" snat"),
				both(NodePort, node80, localEP, localEP+" snat"),
			),
		},
		{
			name: "ingress without a NodePort (allocateLoadBalancerNodePorts false)",
			svc: web(func(s *v1.Service) {
				s.Spec.Type = v1.ServiceTypeLoadBalancer
				s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: lbIP}}
			}),
			slices: one,
			want: lines(
				"socket ClusterIP "+cip80+" -> "+localEP,
				both(LoadBalancer, lb80, localEP, localEP+" snat"),
			),
		},
	})
}

func TestAllFrontendsNodePorts(t *testing.T) {
	dualSlices := []*discovery.EndpointSlice{
		webSlice("web-v4", ep("10.244.1.1", "node-a")),
		webSlice6("web-v6", ep("fd6b:7072:244:2::1", "node-b")),
	}
	nodePortSvc := func(mutate func(*v1.Service)) *v1.Service {
		return web(func(s *v1.Service) {
			s.Spec.Type = v1.ServiceTypeNodePort
			if mutate != nil {
				mutate(s)
			}
		}, withNodePort(httpPort()))
	}
	const ep6 = "[fd6b:7072:244:2::1]:8080"
	runNSCases(t, []nsCase{
		{
			name:      "dual-stack: NodePorts on every node address of each family, with that family's endpoints",
			svc:       nodePortSvc(dualStack),
			slices:    dualSlices,
			nodeAddrs: []string{nodeAddr4, nodeAddr6, "198.18.1.11"},
			want: lines(
				"socket ClusterIP "+cip80+" -> "+localEP,
				both(NodePort, node80, localEP, localEP+" snat"),
				both(NodePort, "198.18.1.11:30080/tcp", localEP, localEP+" snat"),
				both(NodePort, "["+nodeAddr6+"]:30080/tcp", ep6, ep6+" snat"),
				"socket ClusterIP ["+vip6+"]:80/tcp -> "+ep6,
			),
		},
		{
			name:      "dual-stack, eTP Local: decided per family",
			svc:       nodePortSvc(func(s *v1.Service) { dualStack(s); s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal }),
			slices:    dualSlices,
			nodeAddrs: []string{nodeAddr4, nodeAddr6},
			want: lines(
				"socket ClusterIP "+cip80+" -> "+localEP,
				both(NodePort, node80, localEP, localEP),
				both(NodePort, "["+nodeAddr6+"]:30080/tcp", ep6, "UNREACHABLE"),
				"socket ClusterIP ["+vip6+"]:80/tcp -> "+ep6,
			),
		},
		{
			name:      "single-stack IPv4: no NodePort on IPv6 node addresses",
			svc:       nodePortSvc(nil),
			slices:    dualSlices,
			nodeAddrs: []string{nodeAddr6, nodeAddr4},
			want: lines(
				"socket ClusterIP "+cip80+" -> "+localEP,
				both(NodePort, node80, localEP, localEP+" snat"),
			),
		},
		{
			name:      "IPv4-mapped and repeated node addresses count once",
			svc:       nodePortSvc(nil),
			slices:    dualSlices,
			nodeAddrs: []string{"::ffff:" + nodeAddr4, nodeAddr4},
			want: lines(
				"socket ClusterIP "+cip80+" -> "+localEP,
				both(NodePort, node80, localEP, localEP+" snat"),
			),
		},
		{
			name:      "no NodePort addresses: no NodePort frontends",
			svc:       nodePortSvc(nil),
			slices:    dualSlices,
			nodeAddrs: []string{},
			want:      []string{"socket ClusterIP " + cip80 + " -> " + localEP},
		},
		{
			name: "each port its own NodePort and protocol",
			svc: web(func(s *v1.Service) { s.Spec.Type = v1.ServiceTypeNodePort },
				withNodePort(httpPort()),
				v1.ServicePort{Name: "dns", Protocol: v1.ProtocolUDP, Port: 53, NodePort: 30053}),
			slices: []*discovery.EndpointSlice{slice(ns, svcName, "web-1", discovery.AddressTypeIPv4,
				[]discovery.EndpointPort{slicePort("http", v1.ProtocolTCP, 8080), slicePort("dns", v1.ProtocolUDP, 5353)},
				ep("10.244.1.1", "node-a"))},
			want: lines(
				"socket ClusterIP "+vip4+":53/udp -> 10.244.1.1:5353",
				"socket ClusterIP "+cip80+" -> "+localEP,
				both(NodePort, nodeAddr4+":30053/udp", "10.244.1.1:5353", "10.244.1.1:5353 snat"),
				both(NodePort, node80, localEP, localEP+" snat"),
			),
		},
	})
}

func TestAllFrontendsSourceRanges(t *testing.T) {
	dualLB := func(ranges ...string) *v1.Service {
		return lbWeb(func(s *v1.Service) {
			dualStack(s)
			s.Spec.ExternalIPs = nil
			s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: lbIP}, {IP: "192.0.2.101"}, {IP: lbIP6}}
			s.Spec.LoadBalancerSourceRanges = ranges
		})
	}
	for _, tc := range []struct {
		name      string
		svc       *v1.Service
		nodeAddrs []string
		v4, v6    string // the LoadBalancer frontends' ranges, comma-separated
		problems  []string
	}{
		{name: "none: every client", svc: dualLB()},
		{
			name: "split by family; blanks trimmed; leading zeros read as kube-proxy does; masked",
			svc:  dualLB(" 203.0.113.0/25", "2001:db8:f::1/48 ", "203.0.113.000/025", "10.1.2.3/8"),
			v4:   "203.0.113.0/25,203.0.113.0/25,10.0.0.0/8", v6: "2001:db8:f::/48",
		},
		{
			name: "a /0 allows every client of its family only",
			svc:  dualLB("0.0.0.0/0", "203.0.113.0/25", "2001:db8:f::/48"),
			v6:   "2001:db8:f::/48",
		},
		{
			name:      "a NodePort address among them: the LB IPs of that family are allowed too",
			svc:       dualLB("198.18.0.0/24", "2001:db8:f::/48"),
			nodeAddrs: []string{nodeAddr4, nodeAddr6},
			v4:        "198.18.0.0/24,192.0.2.100/32,192.0.2.101/32", v6: "2001:db8:f::/48",
		},
		{
			name:      "an LB IP already listed is not repeated",
			svc:       dualLB("198.18.0.0/24", "192.0.2.100/32"),
			nodeAddrs: []string{nodeAddr4},
			v4:        "198.18.0.0/24,192.0.2.100/32,192.0.2.101/32",
		},
		{
			name:     "a bad range is skipped and reported; the others still apply",
			svc:      dualLB("bogus", "203.0.113.0/25", "", "10.0.0.0/33"),
			v4:       "203.0.113.0/25",
			problems: []string{`spec.loadBalancerSourceRanges[0]: "bogus" is not a CIDR`, `spec.loadBalancerSourceRanges[3]: "10.0.0.0/33" is not a CIDR`},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var addrs []netip.Addr
			for _, s := range tc.nodeAddrs {
				addrs = append(addrs, netip.MustParseAddr(s))
			}
			_, fes, problems := AllFrontends(tc.svc, nil, nodeA, addrs, Options{ExternalClusterIP: true})
			var gotProblems []string
			for _, p := range problems {
				gotProblems = append(gotProblems, p.String())
			}
			if !slices.Equal(gotProblems, tc.problems) {
				t.Errorf("problems %q, want %q", gotProblems, tc.problems)
			}
			nLB := 0
			for _, f := range fes {
				var ss []string
				for _, p := range f.LoadBalancerSourceRanges {
					ss = append(ss, p.String())
				}
				got, want := strings.Join(ss, ","), ""
				if f.Type == LoadBalancer {
					nLB++
					want = tc.v6
					if f.Addr.Is4() {
						want = tc.v4
					}
				}
				if got != want {
					t.Errorf("%s %s %s: source ranges %q, want %q", f.Scope, f.Type, f.FrontendKey, got, want)
				}
			}
			if nLB != 6 { // 3 LB IPs x 2 scopes
				t.Errorf("%d LoadBalancer frontends, want 6:%s", nLB, fmtFrontends(fes))
			}
		})
	}
}

// With Options.NodePortSourceRanges a LoadBalancer Service's NodePorts, in the external scope
// only, carry the same ranges as its load-balancer IPs; without it (kube-proxy's behaviour) and
// for a NodePort Service they carry none.
func TestAllFrontendsNodePortSourceRanges(t *testing.T) {
	lb := lbWeb(func(s *v1.Service) {
		dualStack(s)
		s.Spec.LoadBalancerSourceRanges = []string{"203.0.113.0/25", "2001:db8:f::/48"}
	})
	np := lb.DeepCopy()
	np.Spec.Type = v1.ServiceTypeNodePort
	addrs := []netip.Addr{netip.MustParseAddr(nodeAddr4), netip.MustParseAddr(nodeAddr6)}
	for _, tc := range []struct {
		name string
		svc  *v1.Service
		on   bool
		want bool
	}{
		{"LoadBalancer Service, setting on", lb, true, true},
		{"LoadBalancer Service, setting off", lb, false, false},
		{"NodePort Service, setting on", np, true, false},
	} {
		_, fes, _ := AllFrontends(tc.svc, nil, nodeA, addrs, Options{NodePortSourceRanges: tc.on})
		nNP := 0
		for _, f := range fes {
			if f.Type != NodePort {
				continue
			}
			nNP++
			want := ""
			if tc.want && f.Scope == ScopeExternal {
				want = "203.0.113.0/25"
				if f.Addr.Is6() {
					want = "2001:db8:f::/48"
				}
			}
			var ss []string
			for _, p := range f.LoadBalancerSourceRanges {
				ss = append(ss, p.String())
			}
			if got := strings.Join(ss, ","); got != want {
				t.Errorf("%s: %s NodePort %s: source ranges %q, want %q", tc.name, f.Scope, f.FrontendKey, got, want)
			}
		}
		if nNP == 0 {
			t.Errorf("%s: no NodePort frontends:%s", tc.name, fmtFrontends(fes))
		}
	}
}

func TestAllFrontendsProblems(t *testing.T) {
	one := []*discovery.EndpointSlice{webSlice("web-1", ep("10.244.1.1", "node-a"))}
	runNSCases(t, []nsCase{
		{
			name: "bad external and ingress IPs are skipped and reported; the rest is served",
			svc: lbWeb(func(s *v1.Service) {
				s.Spec.ExternalIPs = []string{"192.0.2.51", "1.2.3", "", " ", "fe80::1%eth0", extIP}
				s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "not-an-ip"}, {IP: lbIP}, {IP: "192.0.2.300", IPMode: ptrTo(v1.LoadBalancerIPModeVIP)}}
			}),
			slices: one,
			want: lines(
				"socket ClusterIP "+cip80+" -> "+localEP,
				both(ExternalIP, ext80, localEP, localEP+" snat"),
				both(ExternalIP, "192.0.2.51:80/tcp", localEP, localEP+" snat"),
				both(LoadBalancer, lb80, localEP, localEP+" snat"),
				both(NodePort, node80, localEP, localEP+" snat"),
			),
			problems: []string{
				`spec.externalIPs[1]: "1.2.3" is not an IP address`,
				`spec.externalIPs[4]: "fe80::1%eth0" is not an IP address`,
				`status.loadBalancer.ingress[0].ip: "not-an-ip" is not an IP address`,
				`status.loadBalancer.ingress[2].ip: "192.0.2.300" is not an IP address`,
			},
		},
		{
			name: "leading zeros are read as kube-proxy does (objects stored before they were refused)",
			svc: service(ns, svcName, "10.96.000.010", []v1.ServicePort{withNodePort(httpPort())}, func(s *v1.Service) {
				s.Spec.Type = v1.ServiceTypeLoadBalancer
				s.Spec.ExternalIPs = []string{"192.0.2.050"}
				s.Status.LoadBalancer.Ingress = []v1.LoadBalancerIngress{{IP: "192.0.2.0100"}}
			}),
			slices: []*discovery.EndpointSlice{webSlice("web-1", ep("10.244.01.001", "node-a"))},
			want: lines(
				"socket ClusterIP "+cip80+" -> "+localEP,
				both(ExternalIP, ext80, localEP, localEP+" snat"),
				both(LoadBalancer, lb80, localEP, localEP+" snat"),
				both(NodePort, node80, localEP, localEP+" snat"),
			),
		},
		{
			name: "the same address twice: the first wins, the other is reported",
			svc: lbWeb(func(s *v1.Service) {
				s.Spec.ExternalIPs = []string{lbIP, extIP, extIP}
			}),
			slices: one,
			want: lines(
				"socket ClusterIP "+cip80+" -> "+localEP,
				both(ExternalIP, ext80, localEP, localEP+" snat"),
				both(LoadBalancer, lb80, localEP, localEP+" snat"),
				both(NodePort, node80, localEP, localEP+" snat"),
			),
			problems: []string{
				// In the order of the frontends' keys.
				`spec.externalIPs[2]: ExternalIP ` + ext80 + ` is already served as ExternalIP (spec.externalIPs[1])`,
				`spec.externalIPs[0]: ExternalIP ` + lb80 + ` is already served as LoadBalancer (status.loadBalancer.ingress[0].ip)`,
			},
		},
		{
			name: "a bad ClusterIP leaves the other family served",
			svc: web(func(s *v1.Service) {
				dualStack(s)
				s.Spec.ClusterIPs = []string{"10.96.0.256", vip6}
			}),
			slices: []*discovery.EndpointSlice{webSlice6("web-v6", ep("fd6b:7072:244:1::1", "node-a"))},
			want:   []string{"socket ClusterIP [" + vip6 + "]:80/tcp -> [fd6b:7072:244:1::1]:8080"},
			problems: []string{
				`spec.clusterIPs[0]: "10.96.0.256" is not an IP address`,
			},
		},
		{
			name: "a NodePort out of range is reported; the port's other frontends are served",
			svc: lbWeb(func(s *v1.Service) {
				dualStack(s)
				s.Spec.Ports[0].NodePort = 70000
			}),
			slices:    one,
			nodeAddrs: []string{nodeAddr4, nodeAddr6},
			want: lines(
				"socket ClusterIP "+cip80+" -> "+localEP,
				both(ExternalIP, ext80, localEP, localEP+" snat"),
				both(LoadBalancer, lb80, localEP, localEP+" snat"),
				"socket ClusterIP ["+vip6+"]:80/tcp -> REJECT",
			),
			problems: []string{`spec.ports[0].nodePort: 70000 is not a port`},
		},
		{
			name: "eTP Local LoadBalancer without a health check port",
			svc: lbWeb(func(s *v1.Service) {
				etpLocal(s)
				s.Spec.HealthCheckNodePort = 0
			}),
			slices: one,
			want: lines(
				"socket ClusterIP "+cip80+" -> "+localEP,
				both(ExternalIP, ext80, localEP, localEP),
				both(LoadBalancer, lb80, localEP, localEP),
				both(NodePort, node80, localEP, localEP),
			),
			problems: []string{"spec.healthCheckNodePort: 0 is not a port; a LoadBalancer Service with externalTrafficPolicy Local needs one"},
		},
	})
}

func TestAllFrontendsServiceInfo(t *testing.T) {
	for _, tc := range []struct {
		name   string
		svc    *v1.Service
		slices []*discovery.EndpointSlice
		want   ServiceInfo
	}{
		{"LoadBalancer, eTP Local: health check port", lbWeb(etpLocal), twoEndpoints(), ServiceInfo{HealthCheckNodePort: 32000, LocalReadyEndpoints: [2]int{1, 0}}},
		{"LoadBalancer, eTP Cluster: none", lbWeb(func(s *v1.Service) { s.Spec.HealthCheckNodePort = 32000 }), twoEndpoints(), ServiceInfo{LocalReadyEndpoints: [2]int{1, 0}}},
		{"NodePort, eTP Local: none (the API allocates it for LoadBalancer Services only)", web(func(s *v1.Service) {
			s.Spec.Type = v1.ServiceTypeNodePort
			etpLocal(s)
		}, withNodePort(httpPort())), twoEndpoints(), ServiceInfo{LocalReadyEndpoints: [2]int{1, 0}}},
		{"ClusterIP: none", web(nil), nil, ServiceInfo{}},
		{
			name: "local ready endpoints: distinct addresses over ports, per family; not terminating, not remote",
			svc:  lbWeb(etpLocal),
			slices: []*discovery.EndpointSlice{
				slice(ns, svcName, "web-1", discovery.AddressTypeIPv4,
					[]discovery.EndpointPort{slicePort("http", v1.ProtocolTCP, 8080), slicePort("metrics", v1.ProtocolTCP, 9090)},
					ep("10.244.1.1", "node-a"), ep("10.244.1.2", "node-a"), epCond("10.244.1.3", "node-a", false, true, true), ep("10.244.2.1", "node-b")),
				webSlice6("web-v6", ep("fd6b:7072:244:1::1", "node-a")),
			},
			want: ServiceInfo{HealthCheckNodePort: 32000, LocalReadyEndpoints: [2]int{2, 1}},
		},
		{"ignored Service: nothing", lbWeb(func(s *v1.Service) { etpLocal(s); s.Spec.Type = v1.ServiceTypeExternalName }), twoEndpoints(), ServiceInfo{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, _, _ := AllFrontends(tc.svc, ServiceEndpoints(tc.slices, nodeA.Name), nodeA, nil, Options{})
			if got != tc.want {
				t.Errorf("ServiceInfo %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestAllFrontendsShortCircuit checks what upstream's "node to NodePort with eTP:Local" row
// means to check but does not (it targets svc1's NodePort): the node reaching the eTP:Local
// Service's own NodePort gets every endpoint, while external clients get only the local one.
func TestAllFrontendsShortCircuit(t *testing.T) {
	fes := worldInternalExternalMasquerade().frontends(t)
	node, ext, dst := netip.MustParseAddr(testNodeIP), netip.MustParseAddr(testExternalClient), netip.MustParseAddr(testNodeIP)
	for _, tc := range []struct {
		scope Scope
		src   netip.Addr
		want  string
	}{
		{ScopeSocket, node, "10.180.0.2:80, 10.180.1.2:80"},
		{ScopeExternal, ext, "10.180.0.2:80"},
	} {
		v, f, err := deliver(fes, tc.scope, tc.src, dst, 3002, v1.ProtocolTCP)
		if err != nil || v != viaBackends {
			t.Fatalf("%s scope, %s -> %s:3002: %v, %v", tc.scope, tc.src, dst, v, err)
		}
		if want := mustAddrPorts(t, strings.Split(tc.want, ",")...); !slices.Equal(f.Backends, want) {
			t.Errorf("%s scope, %s -> %s:3002: backends %s, want %s", tc.scope, tc.src, dst, fmtAddrPorts(f.Backends), fmtAddrPorts(want))
		}
	}
}

func TestTypeOwnsAddress(t *testing.T) {
	for typ, want := range map[Type]bool{ClusterIP: true, NodePort: false, ExternalIP: false, LoadBalancer: false} {
		if got := typ.OwnsAddress(); got != want {
			t.Errorf("%s.OwnsAddress() = %v, want %v", typ, got, want)
		}
	}
}

func annotated(mode string) func(*v1.Service) {
	return func(s *v1.Service) { s.Annotations = map[string]string{AnnotationForwardingMode: mode} }
}

func TestAllFrontendsForwardingMode(t *testing.T) {
	dns := svcPort("dns", v1.ProtocolUDP, 53, 5353)
	dns.NodePort = 30053
	tcpAndUDP := func(mutate func(*v1.Service)) *v1.Service {
		return web(func(s *v1.Service) {
			s.Spec.Type = v1.ServiceTypeNodePort
			if mutate != nil {
				mutate(s)
			}
		}, withNodePort(httpPort()), dns)
	}
	slices2 := []*discovery.EndpointSlice{slice(ns, svcName, "web-1", discovery.AddressTypeIPv4,
		[]discovery.EndpointPort{slicePort("http", v1.ProtocolTCP, 8080), slicePort("dns", v1.ProtocolUDP, 5353)},
		ep("10.244.1.1", "node-a"), ep("10.244.2.1", "node-b"))}
	udpEPs := "10.244.1.1:5353 10.244.2.1:5353"
	cip53, node53 := vip4+":53/udp", nodeAddr4+":30053/udp"
	runNSCases(t, []nsCase{
		{
			name:   "dsr on the node: every external frontend but the ClusterIP, both protocols",
			svc:    lbWeb(nil),
			slices: twoEndpoints(),
			opts:   Options{Mode: ModeDSR, ExternalClusterIP: true},
			want: lines(
				both(ClusterIP, cip80, bothEPs, bothEPs+" snat"),
				both(ExternalIP, ext80, bothEPs, bothEPs+" dsr"),
				both(LoadBalancer, lb80, bothEPs, bothEPs+" dsr"),
				both(NodePort, node80, bothEPs, bothEPs+" dsr"),
			),
		},
		{
			name:   "dsr on the node, UDP too",
			svc:    tcpAndUDP(nil),
			slices: slices2,
			opts:   Options{Mode: ModeDSR},
			want: lines(
				"socket ClusterIP "+cip53+" -> "+udpEPs,
				"socket ClusterIP "+cip80+" -> "+bothEPs,
				both(NodePort, node53, udpEPs, udpEPs+" dsr"),
				both(NodePort, node80, bothEPs, bothEPs+" dsr"),
			),
		},
		{
			name:   "hybrid on the node: DSR for TCP, SNAT for UDP",
			svc:    tcpAndUDP(nil),
			slices: slices2,
			opts:   Options{Mode: ModeHybrid},
			want: lines(
				"socket ClusterIP "+cip53+" -> "+udpEPs,
				"socket ClusterIP "+cip80+" -> "+bothEPs,
				both(NodePort, node53, udpEPs, udpEPs+" snat"),
				both(NodePort, node80, bothEPs, bothEPs+" dsr"),
			),
		},
		{
			name:   "the annotation overrides the node: hybrid where the node says snat",
			svc:    tcpAndUDP(annotated("hybrid")),
			slices: slices2,
			want: lines(
				"socket ClusterIP "+cip53+" -> "+udpEPs,
				"socket ClusterIP "+cip80+" -> "+bothEPs,
				both(NodePort, node53, udpEPs, udpEPs+" snat"),
				both(NodePort, node80, bothEPs, bothEPs+" dsr"),
			),
		},
		{
			name:   "the annotation overrides the node: snat where the node says dsr",
			svc:    lbWeb(annotated("snat")),
			slices: twoEndpoints(),
			opts:   Options{Mode: ModeDSR},
			want: lines(
				"socket ClusterIP "+cip80+" -> "+bothEPs,
				both(ExternalIP, ext80, bothEPs, bothEPs+" snat"),
				both(LoadBalancer, lb80, bothEPs, bothEPs+" snat"),
				both(NodePort, node80, bothEPs, bothEPs+" snat"),
			),
		},
		{
			name:   "externalTrafficPolicy Local: local backends keep the client's address without DSR",
			svc:    lbWeb(etpLocal),
			slices: twoEndpoints(),
			opts:   Options{Mode: ModeDSR},
			want: lines(
				"socket ClusterIP "+cip80+" -> "+bothEPs,
				both(ExternalIP, ext80, bothEPs, localEP),
				both(LoadBalancer, lb80, bothEPs, localEP),
				both(NodePort, node80, bothEPs, localEP),
			),
		},
		{
			name:   "an unknown mode in the annotation is reported; the node's mode applies",
			svc:    lbWeb(annotated("DSR")),
			slices: twoEndpoints(),
			opts:   Options{Mode: ModeDSR},
			want: lines(
				"socket ClusterIP "+cip80+" -> "+bothEPs,
				both(ExternalIP, ext80, bothEPs, bothEPs+" dsr"),
				both(LoadBalancer, lb80, bothEPs, bothEPs+" dsr"),
				both(NodePort, node80, bothEPs, bothEPs+" dsr"),
			),
			problems: []string{`metadata.annotations[kpr.dev/forwarding-mode]: "DSR" is not snat, dsr or hybrid; the node's mode (dsr) applies`},
		},
	})
}
