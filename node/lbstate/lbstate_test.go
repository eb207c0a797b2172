package lbstate

import (
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
)

// Semantics of lbstate that the reference table (reference_test.go) does not exercise. Unless a
// case says otherwise, the node is node-a in zone-a and the Service is default/web, ClusterIP
// 10.96.0.10, port http 80/TCP -> targetPort 8080.

var nodeA = Node{Name: "node-a", Zone: "zone-a"}

const (
	ns      = "default"
	svcName = "web"
	vip4    = "10.96.0.10"
	vip6    = "fd6b:7072:96::10"
)

func httpPort() v1.ServicePort { return svcPort("http", v1.ProtocolTCP, 80, 8080) }

// web is default/web with the given ports (http if none) and mutation.
func web(mutate func(*v1.Service), ports ...v1.ServicePort) *v1.Service {
	if len(ports) == 0 {
		ports = []v1.ServicePort{httpPort()}
	}
	return service(ns, svcName, vip4, ports, mutate)
}

func itpLocal(s *v1.Service) {
	s.Spec.InternalTrafficPolicy = ptrTo(v1.ServiceInternalTrafficPolicyLocal)
}

func dualStack(s *v1.Service) {
	s.Spec.ClusterIPs = []string{vip4, vip6}
	s.Spec.IPFamilies = []v1.IPFamily{v1.IPv4Protocol, v1.IPv6Protocol}
	s.Spec.IPFamilyPolicy = ptrTo(v1.IPFamilyPolicyRequireDualStack)
}

// webSlice is an IPv4 EndpointSlice of default/web with port http 8080/TCP.
func webSlice(name string, eps ...discovery.Endpoint) *discovery.EndpointSlice {
	return slice(ns, svcName, name, discovery.AddressTypeIPv4, []discovery.EndpointPort{slicePort("http", v1.ProtocolTCP, 8080)}, eps...)
}

// webSlice6 is the IPv6 counterpart of webSlice.
func webSlice6(name string, eps ...discovery.Endpoint) *discovery.EndpointSlice {
	return slice(ns, svcName, name, discovery.AddressTypeIPv6, []discovery.EndpointPort{slicePort("http", v1.ProtocolTCP, 8080)}, eps...)
}

// wantFE is one expected frontend.
type wantFE struct {
	key         string   // "addr:port/PROTO"
	port        string   // the Service port name
	backends    []string // in order
	unreachable bool     // NoBackends == Unreachable (checked only without backends)
	affinity    uint32
}

// fe80 is the frontend of port http on addr (vip4 if ""), with the given backends.
func fe80(addr string, backends ...string) wantFE {
	if addr == "" {
		addr = vip4
	}
	return wantFE{key: netip.AddrPortFrom(netip.MustParseAddr(addr), 80).String() + "/TCP", port: "http", backends: backends}
}

func (w wantFE) unreach() wantFE { w.unreachable = true; return w }

// checkFrontends compares got with want, in order, field by field.
func checkFrontends(t *testing.T, svc *v1.Service, got []Frontend, want []wantFE) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d frontends, want %d:%s", len(got), len(want), fmtFrontends(got))
	}
	for i, w := range want {
		g := got[i]
		slash := strings.LastIndexByte(w.key, '/')
		ap := netip.MustParseAddrPort(w.key[:slash])
		wantKey := FrontendKey{Addr: ap.Addr(), Port: ap.Port(), Protocol: v1.Protocol(w.key[slash+1:]), Scope: ScopeSocket}
		wantSPN := ServicePortName{Namespace: svc.Namespace, Name: svc.Name, Port: w.port, Protocol: wantKey.Protocol}
		wantBackends := mustAddrPorts(t, w.backends...)
		wantVerdict := Reject
		if w.unreachable {
			wantVerdict = Unreachable
		}
		switch {
		case g.FrontendKey != wantKey:
			t.Errorf("frontend %d: key %s (%s), want %s (%s)", i, g.FrontendKey, g.Scope, wantKey, wantKey.Scope)
		case g.Service != wantSPN:
			t.Errorf("frontend %d (%s): service %+v, want %+v", i, g.FrontendKey, g.Service, wantSPN)
		case g.Type != ClusterIP:
			t.Errorf("frontend %d (%s): type %s, want ClusterIP", i, g.FrontendKey, g.Type)
		case !slices.Equal(g.Backends, wantBackends):
			t.Errorf("frontend %d (%s): backends %s, want %s", i, g.FrontendKey, fmtAddrPorts(g.Backends), fmtAddrPorts(wantBackends))
		case len(wantBackends) == 0 && g.NoBackends != wantVerdict:
			t.Errorf("frontend %d (%s): no backends with verdict %d, want %d (Reject=%d, Unreachable=%d)",
				i, g.FrontendKey, g.NoBackends, wantVerdict, Reject, Unreachable)
		case g.AffinityTimeoutSec != w.affinity:
			t.Errorf("frontend %d (%s): affinity timeout %d, want %d", i, g.FrontendKey, g.AffinityTimeoutSec, w.affinity)
		}
	}
	if t.Failed() {
		t.Logf("all frontends:%s", fmtFrontends(got))
	}
}

type feCase struct {
	name   string
	svc    *v1.Service
	slices []*discovery.EndpointSlice
	node   *Node // nil: nodeA
	want   []wantFE
}

func runFECases(t *testing.T, cases []feCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			node := nodeA
			if tc.node != nil {
				node = *tc.node
			}
			checkFrontends(t, tc.svc, frontendsFor(tc.svc, tc.slices, node), tc.want)
		})
	}
}

func TestIgnored(t *testing.T) {
	for _, tc := range []struct {
		name   string
		svc    *v1.Service
		reason string // substring of Ignored's answer; "" means the Service is served
	}{
		{"ClusterIP Service is served", web(nil), ""},
		{"NodePort Service is served", web(func(s *v1.Service) { s.Spec.Type = v1.ServiceTypeNodePort }), ""},
		{"LoadBalancer Service is served", web(func(s *v1.Service) { s.Spec.Type = v1.ServiceTypeLoadBalancer }), ""},
		{"unrelated labels do not matter", web(func(s *v1.Service) { s.Labels = map[string]string{"app": "web"} }), ""},
		{"ExternalName", service(ns, svcName, "", nil, func(s *v1.Service) {
			s.Spec.Type = v1.ServiceTypeExternalName
			s.Spec.ExternalName = "db.example.com"
			s.Spec.Ports = []v1.ServicePort{httpPort()}
		}), "ExternalName"},
		{"ExternalName even with a ClusterIP", web(func(s *v1.Service) {
			s.Spec.Type = v1.ServiceTypeExternalName
			s.Spec.ExternalName = "db.example.com"
		}), "ExternalName"},
		{"headless (clusterIP None)", web(func(s *v1.Service) {
			s.Spec.ClusterIP = v1.ClusterIPNone
			s.Spec.ClusterIPs = []string{v1.ClusterIPNone}
		}), "headless"},
		{"no ClusterIP allocated", web(func(s *v1.Service) { s.Spec.ClusterIP = "" }), "headless"},
		{"service-proxy-name label names another proxy", web(func(s *v1.Service) {
			s.Labels = map[string]string{LabelServiceProxyName: "other-proxy"}
		}), LabelServiceProxyName},
		{"service-proxy-name label with an empty value", web(func(s *v1.Service) {
			s.Labels = map[string]string{LabelServiceProxyName: ""}
		}), LabelServiceProxyName},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Ignored(tc.svc)
			switch {
			case tc.reason == "" && got != "":
				t.Errorf("Ignored = %q, want served", got)
			case tc.reason != "" && !strings.Contains(got, tc.reason):
				t.Errorf("Ignored = %q, want a reason mentioning %q", got, tc.reason)
			}
			// An ignored Service has no frontends even when it has endpoints.
			fes := frontendsFor(tc.svc, []*discovery.EndpointSlice{webSlice("web-1", ep("10.244.1.1", "node-a"))}, nodeA)
			if served := tc.reason == ""; served != (len(fes) > 0) {
				t.Errorf("served=%v but Frontends returned:%s", served, fmtFrontends(fes))
			}
		})
	}
}

func TestFrontendsEndpointSelection(t *testing.T) {
	runFECases(t, []feCase{
		{
			name: "several slices of one Service are merged",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{
				webSlice("web-a", ep("10.244.1.1", "node-a")),
				webSlice("web-b", ep("10.244.2.1", "node-b"), ep("10.244.3.1", "node-c")),
				webSlice("web-c"),
			},
			want: []wantFE{fe80("", "10.244.1.1:8080", "10.244.2.1:8080", "10.244.3.1:8080")},
		},
		{
			name: "slices of other Services do not leak in",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{
				webSlice("web-a", ep("10.244.1.1", "node-a")),
				slice(ns, "api", "api-1", discovery.AddressTypeIPv4, []discovery.EndpointPort{slicePort("http", v1.ProtocolTCP, 8080)}, ep("10.244.9.1", "node-a")),
				slice("other", svcName, "web-1", discovery.AddressTypeIPv4, []discovery.EndpointPort{slicePort("http", v1.ProtocolTCP, 8080)}, ep("10.244.9.2", "node-a")),
			},
			want: []wantFE{fe80("", "10.244.1.1:8080")},
		},
		{
			name: "each slice keeps its own port number (targetPort rollout)",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{
				webSlice("web-a", ep("10.244.1.1", "node-a")),
				slice(ns, svcName, "web-b", discovery.AddressTypeIPv4, []discovery.EndpointPort{slicePort("http", v1.ProtocolTCP, 8081)}, ep("10.244.2.1", "node-b")),
			},
			want: []wantFE{fe80("", "10.244.1.1:8080", "10.244.2.1:8081")},
		},
		{
			name: "the same endpoint in two slices is one backend",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{
				webSlice("web-a", ep("10.244.1.1", "node-a"), ep("10.244.2.1", "node-b")),
				webSlice("web-b", ep("10.244.1.1", "node-a")),
			},
			want: []wantFE{fe80("", "10.244.1.1:8080", "10.244.2.1:8080")},
		},
		{
			name: "duplicate endpoint: the non-terminating copy wins (ready slice first)",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{
				webSlice("web-a", ep("10.244.1.1", "node-a"), ep("10.244.2.1", "node-b")),
				webSlice("web-b", epCond("10.244.1.1", "node-a", false, true, true)),
			},
			want: []wantFE{fe80("", "10.244.1.1:8080", "10.244.2.1:8080")},
		},
		{
			name: "duplicate endpoint: the non-terminating copy wins (terminating slice first)",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{
				webSlice("web-b", epCond("10.244.1.1", "node-a", false, true, true)),
				webSlice("web-a", ep("10.244.1.1", "node-a"), ep("10.244.2.1", "node-b")),
			},
			want: []wantFE{fe80("", "10.244.1.1:8080", "10.244.2.1:8080")},
		},
		{
			// The winning copy brings its node: a remote ready copy beats a local terminating
			// one, so under iTP:Local there is nothing local left.
			name: "duplicate endpoint: the winner's node decides locality",
			svc:  web(itpLocal),
			slices: []*discovery.EndpointSlice{
				webSlice("web-old", epCond("10.244.1.1", "node-a", false, true, true)),
				webSlice("web-new", ep("10.244.1.1", "node-b")),
			},
			want: []wantFE{fe80("").unreach()},
		},
		{
			name: "only ready endpoints are used",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				ep("10.244.1.1", "node-a"),                          // no conditions: ready
				epCond("10.244.1.2", "node-a", false, false, false), // starting
				epCond("10.244.1.3", "node-b", false, true, true),   // serving, terminating
				epCond("10.244.1.4", "node-b", false, false, true),  // terminating
				epCond("10.244.1.5", "node-c", true, true, false),   // ready
				epReady("10.244.1.6", "node-c", false),              // not ready
			)},
			want: []wantFE{fe80("", "10.244.1.1:8080", "10.244.1.5:8080")},
		},
		{
			name: "no ready endpoint: serving terminating endpoints are used",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				epCond("10.244.1.2", "node-a", false, false, false),
				epCond("10.244.1.3", "node-a", false, true, true),
				epCond("10.244.1.4", "node-b", false, false, true),
				epCond("10.244.1.6", "node-b", false, true, true),
				// Serving unset defaults to true.
				func() discovery.Endpoint {
					e := ep("10.244.1.7", "node-c")
					e.Conditions = discovery.EndpointConditions{Ready: ptrTo(false), Terminating: ptrTo(true)}
					return e
				}(),
			)},
			want: []wantFE{fe80("", "10.244.1.3:8080", "10.244.1.6:8080", "10.244.1.7:8080")},
		},
		{
			name: "non-serving terminating endpoints are never used",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				epCond("10.244.1.4", "node-a", false, false, true),
				epCond("10.244.1.5", "node-b", false, false, true),
			)},
			want: []wantFE{fe80("")},
		},
		{
			name: "not ready and not terminating: refused",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				epCond("10.244.1.2", "node-a", false, false, false),
				epReady("10.244.1.6", "node-b", false),
			)},
			want: []wantFE{fe80("")},
		},
		{
			name: "no EndpointSlice: refused",
			svc:  web(nil),
			want: []wantFE{fe80("")},
		},
		{
			name:   "empty EndpointSlice: refused",
			svc:    web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1")},
			want:   []wantFE{fe80("")},
		},
	})
}

func TestFrontendsPorts(t *testing.T) {
	runFECases(t, []feCase{
		{
			name: "named targetPorts resolve through the slice's port names",
			svc: web(nil,
				namedTargetPort("http", v1.ProtocolTCP, 80, "web"),
				namedTargetPort("metrics", v1.ProtocolTCP, 9090, "prom")),
			slices: []*discovery.EndpointSlice{slice(ns, svcName, "web-1", discovery.AddressTypeIPv4,
				[]discovery.EndpointPort{slicePort("metrics", v1.ProtocolTCP, 9100), slicePort("http", v1.ProtocolTCP, 8080)},
				ep("10.244.1.1", "node-a"), ep("10.244.2.1", "node-b"))},
			want: []wantFE{
				fe80("", "10.244.1.1:8080", "10.244.2.1:8080"),
				{key: vip4 + ":9090/TCP", port: "metrics", backends: []string{"10.244.1.1:9100", "10.244.2.1:9100"}},
			},
		},
		{
			name: "a Service port missing from the slices has no backends; extra slice ports make no frontend",
			svc:  web(nil, httpPort(), svcPort("admin", v1.ProtocolTCP, 8443, 0)),
			slices: []*discovery.EndpointSlice{slice(ns, svcName, "web-1", discovery.AddressTypeIPv4,
				[]discovery.EndpointPort{slicePort("http", v1.ProtocolTCP, 8080), slicePort("stale", v1.ProtocolTCP, 9999)},
				ep("10.244.1.1", "node-a"))},
			want: []wantFE{
				fe80("", "10.244.1.1:8080"),
				{key: vip4 + ":8443/TCP", port: "admin"},
			},
		},
		{
			name: "frontends come out sorted by port",
			svc:  web(nil, svcPort("c", v1.ProtocolTCP, 9090, 0), svcPort("a", v1.ProtocolTCP, 80, 0), svcPort("b", v1.ProtocolTCP, 443, 0)),
			want: []wantFE{
				{key: vip4 + ":80/TCP", port: "a"},
				{key: vip4 + ":443/TCP", port: "b"},
				{key: vip4 + ":9090/TCP", port: "c"},
			},
		},
		{
			name: "the same port on TCP and UDP: two frontends, endpoints not mixed",
			svc:  web(nil, svcPort("dns", v1.ProtocolUDP, 53, 0), svcPort("dns-tcp", v1.ProtocolTCP, 53, 5353)),
			slices: []*discovery.EndpointSlice{
				slice(ns, svcName, "web-udp", discovery.AddressTypeIPv4, []discovery.EndpointPort{slicePort("dns", v1.ProtocolUDP, 53)}, ep("10.244.1.1", "node-a")),
				slice(ns, svcName, "web-tcp", discovery.AddressTypeIPv4, []discovery.EndpointPort{slicePort("dns-tcp", v1.ProtocolTCP, 5353)}, ep("10.244.2.1", "node-b")),
			},
			want: []wantFE{
				{key: vip4 + ":53/TCP", port: "dns-tcp", backends: []string{"10.244.2.1:5353"}},
				{key: vip4 + ":53/UDP", port: "dns", backends: []string{"10.244.1.1:53"}},
			},
		},
		{
			name: "a slice port with the right name but another protocol does not match",
			svc:  web(nil, svcPort("dns", v1.ProtocolUDP, 53, 0)),
			slices: []*discovery.EndpointSlice{
				slice(ns, svcName, "web-1", discovery.AddressTypeIPv4, []discovery.EndpointPort{slicePort("dns", v1.ProtocolTCP, 53)}, ep("10.244.1.1", "node-a")),
			},
			want: []wantFE{{key: vip4 + ":53/UDP", port: "dns"}},
		},
		{
			name: "protocol unset on both sides means TCP",
			svc:  web(nil, v1.ServicePort{Name: "http", Port: 80}),
			slices: []*discovery.EndpointSlice{
				slice(ns, svcName, "web-1", discovery.AddressTypeIPv4, []discovery.EndpointPort{{Name: ptrTo("http"), Port: ptrTo[int32](8080)}}, ep("10.244.1.1", "node-a")),
			},
			want: []wantFE{fe80("", "10.244.1.1:8080")},
		},
		{
			name: "SCTP is kept",
			svc:  web(nil, svcPort("sig", v1.ProtocolSCTP, 9999, 0)),
			slices: []*discovery.EndpointSlice{
				slice(ns, svcName, "web-1", discovery.AddressTypeIPv4, []discovery.EndpointPort{slicePort("sig", v1.ProtocolSCTP, 9999)}, ep("10.244.1.1", "node-a")),
			},
			want: []wantFE{{key: vip4 + ":9999/SCTP", port: "sig", backends: []string{"10.244.1.1:9999"}}},
		},
	})
}

func TestFrontendsAddresses(t *testing.T) {
	v6svc := func(s *v1.Service) {
		s.Spec.ClusterIP = vip6
		s.Spec.ClusterIPs = []string{vip6, vip4}
		s.Spec.IPFamilies = []v1.IPFamily{v1.IPv6Protocol, v1.IPv4Protocol}
		s.Spec.IPFamilyPolicy = ptrTo(v1.IPFamilyPolicyPreferDualStack)
	}
	dualSlices := []*discovery.EndpointSlice{
		webSlice("web-v4", ep("10.244.1.5", "node-a"), ep("10.244.2.5", "node-b")),
		webSlice6("web-v6", ep("fd6b:7072:244:1::5", "node-a")),
	}
	runFECases(t, []feCase{
		{
			name:   "dual-stack: each ClusterIP gets its own family's endpoints",
			svc:    web(dualStack),
			slices: dualSlices,
			want: []wantFE{
				fe80(vip4, "10.244.1.5:8080", "10.244.2.5:8080"),
				fe80(vip6, "[fd6b:7072:244:1::5]:8080"),
			},
		},
		{
			name:   "dual-stack with IPv6 as the primary family",
			svc:    web(v6svc),
			slices: dualSlices,
			want: []wantFE{
				fe80(vip4, "10.244.1.5:8080", "10.244.2.5:8080"),
				fe80(vip6, "[fd6b:7072:244:1::5]:8080"),
			},
		},
		{
			name:   "dual-stack without IPv6 endpoints: the IPv6 frontend is refused",
			svc:    web(dualStack),
			slices: dualSlices[:1],
			want: []wantFE{
				fe80(vip4, "10.244.1.5:8080", "10.244.2.5:8080"),
				fe80(vip6),
			},
		},
		{
			name:   "single-stack IPv4 ignores IPv6 endpoints",
			svc:    web(nil),
			slices: dualSlices,
			want:   []wantFE{fe80(vip4, "10.244.1.5:8080", "10.244.2.5:8080")},
		},
		{
			name: "FQDN slices are ignored",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{
				slice(ns, svcName, "web-fqdn", discovery.AddressTypeFQDN, []discovery.EndpointPort{slicePort("http", v1.ProtocolTCP, 8080)},
					ep("db.example.com", "node-a"), ep("10.244.9.9", "node-a")),
				webSlice("web-v4", ep("10.244.1.1", "node-b")),
			},
			want: []wantFE{fe80("", "10.244.1.1:8080")},
		},
		{
			name: "only FQDN slices: refused",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{
				slice(ns, svcName, "web-fqdn", discovery.AddressTypeFQDN, []discovery.EndpointPort{slicePort("http", v1.ProtocolTCP, 8080)},
					ep("10.244.9.9", "node-a")),
			},
			want: []wantFE{fe80("")},
		},
		{
			name: "invalid addresses are ignored; only an endpoint's first address counts",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				ep("not-an-ip", "node-a"),
				ep("10.244.1.256", "node-a"),
				ep("", "node-a"),
				discovery.Endpoint{NodeName: ptrTo("node-a")},
				ep("10.244.1.1", "node-a"),
				discovery.Endpoint{Addresses: []string{"10.244.1.2", "10.244.1.3"}},
			)},
			want: []wantFE{fe80("", "10.244.1.1:8080", "10.244.1.2:8080")},
		},
		{
			name: "invalid slice ports are ignored",
			svc:  web(nil, svcPort("", v1.ProtocolTCP, 80, 8080)),
			slices: func() []*discovery.EndpointSlice {
				tcp := ptrTo(v1.ProtocolTCP)
				mk := func(name string, p discovery.EndpointPort, addr string) *discovery.EndpointSlice {
					return slice(ns, svcName, name, discovery.AddressTypeIPv4, []discovery.EndpointPort{p}, ep(addr, "node-a"))
				}
				return []*discovery.EndpointSlice{
					mk("nil-name", discovery.EndpointPort{Port: ptrTo[int32](8080), Protocol: tcp}, "10.244.1.11"),
					mk("nil-port", discovery.EndpointPort{Name: ptrTo(""), Protocol: tcp}, "10.244.1.12"),
					mk("zero-port", discovery.EndpointPort{Name: ptrTo(""), Port: ptrTo[int32](0), Protocol: tcp}, "10.244.1.13"),
					mk("big-port", discovery.EndpointPort{Name: ptrTo(""), Port: ptrTo[int32](70000), Protocol: tcp}, "10.244.1.14"),
					mk("negative-port", discovery.EndpointPort{Name: ptrTo(""), Port: ptrTo[int32](-1), Protocol: tcp}, "10.244.1.16"),
					mk("valid", discovery.EndpointPort{Name: ptrTo(""), Port: ptrTo[int32](8080), Protocol: tcp}, "10.244.1.15"),
				}
			}(),
			want: []wantFE{{key: vip4 + ":80/TCP", port: "", backends: []string{"10.244.1.15:8080"}}},
		},
	})
}

func TestFrontendsSessionAffinity(t *testing.T) {
	timeout := func(sec int32) *v1.SessionAffinityConfig {
		return &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{TimeoutSeconds: ptrTo(sec)}}
	}
	twoPorts := []v1.ServicePort{httpPort(), svcPort("https", v1.ProtocolTCP, 443, 8443)}
	slices := []*discovery.EndpointSlice{webSlice("web-1", ep("10.244.1.1", "node-a"))}
	for _, tc := range []struct {
		name     string
		mutate   func(*v1.Service)
		affinity uint32
	}{
		{"no affinity", nil, 0},
		{"affinity None", func(s *v1.Service) { s.Spec.SessionAffinity = v1.ServiceAffinityNone }, 0},
		{"affinity None ignores a configured timeout", func(s *v1.Service) {
			s.Spec.SessionAffinity = v1.ServiceAffinityNone
			s.Spec.SessionAffinityConfig = timeout(60)
		}, 0},
		{"ClientIP without config: default timeout", func(s *v1.Service) { s.Spec.SessionAffinity = v1.ServiceAffinityClientIP }, 10800},
		{"ClientIP with an empty config: default timeout", func(s *v1.Service) {
			s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = &v1.SessionAffinityConfig{}
		}, 10800},
		{"ClientIP with no timeout: default timeout", func(s *v1.Service) {
			s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = &v1.SessionAffinityConfig{ClientIP: &v1.ClientIPConfig{}}
		}, 10800},
		{"ClientIP with a custom timeout", func(s *v1.Service) {
			s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = timeout(60)
		}, 60},
		{"ClientIP with the maximum timeout", func(s *v1.Service) {
			s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = timeout(86400)
		}, 86400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			svc := web(tc.mutate, twoPorts...)
			checkFrontends(t, svc, frontendsFor(svc, slices, nodeA), []wantFE{
				{key: vip4 + ":80/TCP", port: "http", backends: []string{"10.244.1.1:8080"}, affinity: tc.affinity},
				{key: vip4 + ":443/TCP", port: "https", affinity: tc.affinity},
			})
		})
	}
	if DefaultAffinityTimeoutSec != 10800 {
		t.Errorf("DefaultAffinityTimeoutSec = %d, want 10800 (the Kubernetes default)", DefaultAffinityTimeoutSec)
	}
	t.Run("every family gets the timeout", func(t *testing.T) {
		svc := web(func(s *v1.Service) {
			dualStack(s)
			s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = timeout(300)
		})
		a, b := fe80(vip4, "10.244.1.1:8080"), fe80(vip6)
		a.affinity, b.affinity = 300, 300
		checkFrontends(t, svc, frontendsFor(svc, slices, nodeA), []wantFE{a, b})
	})
}

func TestFrontendsInternalTrafficPolicy(t *testing.T) {
	runFECases(t, []feCase{
		{
			name: "Local: only the local endpoints",
			svc:  web(itpLocal),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				ep("10.244.1.1", "node-a"), ep("10.244.2.1", "node-b"), ep("10.244.1.2", "node-a"))},
			want: []wantFE{fe80("", "10.244.1.1:8080", "10.244.1.2:8080")},
		},
		{
			name: "Local: local ready endpoints win over local terminating ones",
			svc:  web(itpLocal),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				ep("10.244.1.1", "node-a"), epCond("10.244.1.2", "node-a", false, true, true), ep("10.244.2.1", "node-b"))},
			want: []wantFE{fe80("", "10.244.1.1:8080")},
		},
		{
			name: "Local: no local endpoint, remote ready ones: unreachable",
			svc:  web(itpLocal),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				ep("10.244.2.1", "node-b"), ep("10.244.3.1", "node-c"))},
			want: []wantFE{fe80("").unreach()},
		},
		{
			name: "Local: no local endpoint, remote serving terminating ones: unreachable",
			svc:  web(itpLocal),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				epCond("10.244.2.1", "node-b", false, true, true))},
			want: []wantFE{fe80("").unreach()},
		},
		{
			name: "Local: endpoints without a node are not local",
			svc:  web(itpLocal),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				ep("10.244.2.1", ""))},
			want: []wantFE{fe80("").unreach()},
		},
		{
			name: "Local: no endpoints at all: refused",
			svc:  web(itpLocal),
			want: []wantFE{fe80("")},
		},
		{
			name: "Local: no usable endpoint anywhere: refused",
			svc:  web(itpLocal),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				epCond("10.244.1.1", "node-a", false, false, true),
				epCond("10.244.2.1", "node-b", false, false, false))},
			want: []wantFE{fe80("")},
		},
		{
			name: "Local: falls back to local serving terminating endpoints even if remote ones are ready",
			svc:  web(itpLocal),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				epCond("10.244.1.1", "node-a", false, true, true),
				epCond("10.244.1.2", "node-a", false, false, true),
				ep("10.244.2.1", "node-b"))},
			want: []wantFE{fe80("", "10.244.1.1:8080")},
		},
		{
			name: "Local: a local non-serving terminating endpoint is not used",
			svc:  web(itpLocal),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				epCond("10.244.1.1", "node-a", false, false, true),
				ep("10.244.2.1", "node-b"))},
			want: []wantFE{fe80("").unreach()},
		},
		{
			name: "Cluster (explicit): every ready endpoint",
			svc:  web(func(s *v1.Service) { s.Spec.InternalTrafficPolicy = ptrTo(v1.ServiceInternalTrafficPolicyCluster) }),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				ep("10.244.1.1", "node-a"), ep("10.244.2.1", "node-b"))},
			want: []wantFE{fe80("", "10.244.1.1:8080", "10.244.2.1:8080")},
		},
		{
			name: "Local, dual-stack: decided per family",
			svc:  web(func(s *v1.Service) { dualStack(s); itpLocal(s) }),
			slices: []*discovery.EndpointSlice{
				webSlice("web-v4", ep("10.244.1.1", "node-a"), ep("10.244.2.1", "node-b")),
				webSlice6("web-v6", ep("fd6b:7072:244:2::1", "node-b")),
			},
			want: []wantFE{fe80(vip4, "10.244.1.1:8080"), fe80(vip6).unreach()},
		},
	})
}

func TestFrontendsTopology(t *testing.T) {
	z := func(addr, node string, zones ...string) discovery.Endpoint {
		return withHints(ep(addr, node), zones, nil)
	}
	zn := func(addr, node string, zones, nodes []string) discovery.Endpoint {
		return withHints(ep(addr, node), zones, nodes)
	}
	noZone := Node{Name: "node-a"}
	runFECases(t, []feCase{
		{
			name:   "zone hints: only the endpoints hinted for this node's zone",
			svc:    web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1", z("10.244.1.1", "node-a", "zone-a"), z("10.244.2.1", "node-b", "zone-b"), z("10.244.3.1", "node-c", "zone-a"))},
			want:   []wantFE{fe80("", "10.244.1.1:8080", "10.244.3.1:8080")},
		},
		{
			name:   "zone hints: an endpoint hinted for several zones",
			svc:    web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1", z("10.244.1.1", "node-b", "zone-b", "zone-a"), z("10.244.2.1", "node-b", "zone-b"))},
			want:   []wantFE{fe80("", "10.244.1.1:8080")},
		},
		{
			name:   "zone hints ignored when a ready endpoint has none",
			svc:    web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1", z("10.244.1.1", "node-a", "zone-a"), ep("10.244.2.1", "node-b"))},
			want:   []wantFE{fe80("", "10.244.1.1:8080", "10.244.2.1:8080")},
		},
		{
			name:   "zone hints ignored when none is for this zone",
			svc:    web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1", z("10.244.1.1", "node-b", "zone-b"), z("10.244.2.1", "node-c", "zone-c"))},
			want:   []wantFE{fe80("", "10.244.1.1:8080", "10.244.2.1:8080")},
		},
		{
			name:   "zone hints ignored on a node without a zone",
			svc:    web(nil),
			node:   &noZone,
			slices: []*discovery.EndpointSlice{webSlice("web-1", z("10.244.1.1", "node-a", "zone-a"), z("10.244.2.1", "node-b", "zone-b"))},
			want:   []wantFE{fe80("", "10.244.1.1:8080", "10.244.2.1:8080")},
		},
		{
			name: "endpoints that are not ready need no hints",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				z("10.244.1.1", "node-a", "zone-a"), z("10.244.2.1", "node-b", "zone-b"),
				epCond("10.244.3.1", "node-c", false, false, false), epCond("10.244.3.2", "node-c", false, true, true))},
			want: []wantFE{fe80("", "10.244.1.1:8080")},
		},
		{
			name: "the terminating fallback ignores hints",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				withHints(epCond("10.244.1.1", "node-b", false, true, true), []string{"zone-b"}, nil),
				withHints(epCond("10.244.2.1", "node-c", false, true, true), []string{"zone-a"}, nil))},
			want: []wantFE{fe80("", "10.244.1.1:8080", "10.244.2.1:8080")},
		},
		{
			name:   "internalTrafficPolicy Local ignores hints",
			svc:    web(itpLocal),
			slices: []*discovery.EndpointSlice{webSlice("web-1", z("10.244.1.1", "node-a", "zone-b"), z("10.244.2.1", "node-b", "zone-a"))},
			want:   []wantFE{fe80("", "10.244.1.1:8080")},
		},
		{
			name: "node hints: only the endpoints hinted for this node, before zone hints",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				zn("10.244.1.1", "node-a", []string{"zone-a"}, []string{"node-a"}),
				zn("10.244.2.1", "node-b", []string{"zone-a"}, []string{"node-b"}))},
			want: []wantFE{fe80("", "10.244.1.1:8080")},
		},
		{
			name: "node hints without zone hints",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				zn("10.244.1.1", "node-b", nil, []string{"node-b", "node-a"}),
				zn("10.244.2.1", "node-c", nil, []string{"node-c"}))},
			want: []wantFE{fe80("", "10.244.1.1:8080")},
		},
		{
			name: "node hints missing on a ready endpoint: zone hints apply",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				zn("10.244.1.1", "node-b", []string{"zone-a"}, []string{"node-b"}),
				zn("10.244.2.1", "node-c", []string{"zone-a"}, nil),
				zn("10.244.3.1", "node-a", []string{"zone-b"}, []string{"node-a"}))},
			want: []wantFE{fe80("", "10.244.1.1:8080", "10.244.2.1:8080")},
		},
		{
			name: "no node hint for this node: zone hints apply",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				zn("10.244.1.1", "node-b", []string{"zone-a"}, []string{"node-b"}),
				zn("10.244.2.1", "node-c", []string{"zone-b"}, []string{"node-c"}))},
			want: []wantFE{fe80("", "10.244.1.1:8080")},
		},
		{
			name: "no node hint for this node, no zone hints: every ready endpoint",
			svc:  web(nil),
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				zn("10.244.1.1", "node-b", nil, []string{"node-b"}),
				zn("10.244.2.1", "node-c", nil, []string{"node-c"}))},
			want: []wantFE{fe80("", "10.244.1.1:8080", "10.244.2.1:8080")},
		},
	})
}

func TestServiceEndpoints(t *testing.T) {
	spn := ServicePortName{Namespace: ns, Name: svcName, Port: "http", Protocol: v1.ProtocolTCP}
	hinted := withHints(epCond("10.244.2.1", "node-b", true, true, false), []string{"zone-b"}, []string{"node-b"})
	for _, tc := range []struct {
		name   string
		slices []*discovery.EndpointSlice
		node   string
		want   map[ServicePortName][]Endpoint
	}{
		{
			name: "conditions, locality and hints are carried over, sorted by address",
			slices: []*discovery.EndpointSlice{webSlice("web-1",
				hinted,
				epCond("10.244.1.2", "node-a", false, true, true),
				ep("10.244.1.1", "node-a"))},
			node: "node-a",
			want: map[ServicePortName][]Endpoint{spn: {
				{AddrPort: netip.MustParseAddrPort("10.244.1.1:8080"), Ready: true, Serving: true, Local: true},
				{AddrPort: netip.MustParseAddrPort("10.244.1.2:8080"), Serving: true, Terminating: true, Local: true},
				{AddrPort: netip.MustParseAddrPort("10.244.2.1:8080"), Ready: true, Serving: true, ZoneHints: []string{"zone-b"}, NodeHints: []string{"node-b"}},
			}},
		},
		{
			// Neither an endpoint without a node nor one whose nodeName is "" is local to a
			// node that has no name.
			name: "no node name: nothing is local",
			slices: []*discovery.EndpointSlice{webSlice("web-1", ep("10.244.1.1", ""),
				func() discovery.Endpoint { e := ep("10.244.1.2", ""); e.NodeName = ptrTo(""); return e }())},
			node: "",
			want: map[ServicePortName][]Endpoint{spn: {
				{AddrPort: netip.MustParseAddrPort("10.244.1.1:8080"), Ready: true, Serving: true},
				{AddrPort: netip.MustParseAddrPort("10.244.1.2:8080"), Ready: true, Serving: true},
			}},
		},
		{
			name: "duplicate: the non-terminating copy wins, with its conditions and node",
			slices: []*discovery.EndpointSlice{
				webSlice("web-a", epCond("10.244.1.1", "node-a", false, true, true)),
				webSlice("web-b", ep("10.244.1.1", "node-b")),
				webSlice("web-c", epCond("10.244.1.1", "node-a", false, false, true)),
			},
			node: "node-a",
			want: map[ServicePortName][]Endpoint{spn: {
				{AddrPort: netip.MustParseAddrPort("10.244.1.1:8080"), Ready: true, Serving: true},
			}},
		},
		{
			name: "ports are keyed by name and protocol",
			slices: []*discovery.EndpointSlice{slice(ns, svcName, "web-1", discovery.AddressTypeIPv4,
				[]discovery.EndpointPort{slicePort("dns", v1.ProtocolUDP, 53), slicePort("dns", v1.ProtocolTCP, 5353)},
				ep("10.244.1.1", "node-b"))},
			node: "node-a",
			want: map[ServicePortName][]Endpoint{
				{Namespace: ns, Name: svcName, Port: "dns", Protocol: v1.ProtocolUDP}: {
					{AddrPort: netip.MustParseAddrPort("10.244.1.1:53"), Ready: true, Serving: true}},
				{Namespace: ns, Name: svcName, Port: "dns", Protocol: v1.ProtocolTCP}: {
					{AddrPort: netip.MustParseAddrPort("10.244.1.1:5353"), Ready: true, Serving: true}},
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := ServiceEndpoints(tc.slices, tc.node)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("ServiceEndpoints =\n\t%+v\nwant\n\t%+v", got, tc.want)
			}
		})
	}
}

func TestCategorize(t *testing.T) {
	e := func(addr string, ready, serving, terminating, local bool) Endpoint {
		return Endpoint{AddrPort: netip.MustParseAddrPort(addr), Ready: ready, Serving: serving, Terminating: terminating, Local: local}
	}
	localReady := e("10.244.1.1:80", true, true, false, true)
	localTerm := e("10.244.1.2:80", false, true, true, true)
	localGone := e("10.244.1.3:80", false, false, true, true)
	remoteReady := e("10.244.2.1:80", true, true, false, false)
	remoteTerm := e("10.244.2.2:80", false, true, true, false)
	remoteStarting := e("10.244.2.3:80", false, false, false, false)
	for _, tc := range []struct {
		name           string
		eps            []Endpoint
		cluster, local []Endpoint
		any            bool
	}{
		{"nothing", nil, nil, nil, false},
		{"ready everywhere", []Endpoint{localReady, localTerm, remoteReady}, []Endpoint{localReady, remoteReady}, []Endpoint{localReady}, true},
		{"local terminating, remote ready", []Endpoint{localTerm, localGone, remoteReady}, []Endpoint{remoteReady}, []Endpoint{localTerm}, true},
		{"only remote terminating", []Endpoint{remoteTerm, remoteStarting}, []Endpoint{remoteTerm}, nil, true},
		{"only unusable", []Endpoint{localGone, remoteStarting}, nil, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Categorize(tc.eps, nodeA)
			addrs := func(eps []Endpoint) []netip.AddrPort {
				var out []netip.AddrPort
				for _, e := range eps {
					out = append(out, e.AddrPort)
				}
				return out
			}
			if !slices.Equal(addrs(got.Cluster), addrs(tc.cluster)) {
				t.Errorf("Cluster = %s, want %s", fmtAddrPorts(addrs(got.Cluster)), fmtAddrPorts(addrs(tc.cluster)))
			}
			if !slices.Equal(addrs(got.Local), addrs(tc.local)) {
				t.Errorf("Local = %s, want %s", fmtAddrPorts(addrs(got.Local)), fmtAddrPorts(addrs(tc.local)))
			}
			if got.Any != tc.any {
				t.Errorf("Any = %v, want %v", got.Any, tc.any)
			}
		})
	}
}

// Equal tells frontends apart by every field, so a full sync that skips unchanged Services
// never skips a real change. A field added to Frontend without Equal learning it fails here.
func TestFrontendEqualSeesEveryField(t *testing.T) {
	base := Frontend{
		FrontendKey:              FrontendKey{Addr: netip.MustParseAddr("10.96.0.10"), Port: 80, Protocol: v1.ProtocolTCP},
		Service:                  ServicePortName{Namespace: "default", Name: "web", Port: "http", Protocol: v1.ProtocolTCP},
		Backends:                 []netip.AddrPort{netip.MustParseAddrPort("10.244.1.2:8080")},
		LoadBalancerSourceRanges: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")},
	}
	if !base.Equal(base) {
		t.Fatal("a frontend differs from itself")
	}
	var change func(v reflect.Value, path string)
	change = func(v reflect.Value, path string) {
		for i := range v.NumField() {
			f, name := v.Field(i), path+v.Type().Field(i).Name
			if f.Kind() == reflect.Struct && f.Type() != reflect.TypeOf(netip.Addr{}) {
				change(f, name+".")
				continue
			}
			old := reflect.New(f.Type()).Elem()
			old.Set(f)
			switch f.Interface().(type) {
			case netip.Addr:
				f.Set(reflect.ValueOf(netip.MustParseAddr("10.96.0.11")))
			case []netip.AddrPort:
				f.Set(reflect.ValueOf([]netip.AddrPort{netip.MustParseAddrPort("10.244.1.3:8080")}))
			case []netip.Prefix:
				f.Set(reflect.ValueOf([]netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}))
			default:
				switch f.Kind() {
				case reflect.String:
					f.SetString(f.String() + "x")
				case reflect.Bool:
					f.SetBool(!f.Bool())
				case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
					f.SetUint(f.Uint() + 1)
				case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
					f.SetInt(f.Int() + 1)
				default:
					t.Fatalf("field %s of kind %s: teach this test how to change it", name, f.Kind())
				}
			}
			cur := reflect.ValueOf(&base).Elem().Interface().(Frontend)
			f.Set(old)
			if base.Equal(cur) {
				t.Errorf("Equal does not see a change of %s", name)
			}
		}
	}
	change(reflect.ValueOf(&base).Elem(), "")
}
