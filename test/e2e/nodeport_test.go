package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/kpr-dev/kpr/bpf"
	"github.com/kpr-dev/kpr/test/sandbox"
)

// Addresses outside the cluster that only the sandbox routes: TEST-NET-2 (RFC 5737). The
// external host reaches them through a node (Host.RouteVia); the nodes' default route leads to
// the control-plane namespace, which does not forward, so a packet kpr does not translate dies
// there.
var (
	npExternalIP = netip.MustParseAddr("198.51.100.10") // spec.externalIPs of "ext"
	npLBIP       = netip.MustParseAddr("198.51.100.20") // status.loadBalancer.ingress of "lb"
	npLBProxyIP  = netip.MustParseAddr("198.51.100.21") // the same with ipMode Proxy ("lb-proxy")
	npEmptyIP    = netip.MustParseAddr("198.51.100.30") // spec.externalIPs of "empty", no endpoints
	npRangedIP   = netip.MustParseAddr("198.51.100.40") // ingress of "ranged", with loadBalancerSourceRanges
)

// npProgramWithin bounds how long kpr may take to serve an API change (it should take ~2s).
const npProgramWithin = 5 * time.Second

// npEnv is the north-south topology: two nodes each running kpr, three pods behind the
// Services (two on node1, one on node2) and an external host "client" on the LAN.
type npEnv struct {
	t       *testing.T
	cp      *sandbox.ControlPlane
	nodes   []*sandbox.Node // node1, node2
	kprs    []*sandbox.Kpr
	pods    []*sandbox.Pod     // np-a, np-b (node1), np-c (node2)
	servers []*sandbox.Process // their probe servers
	host    *sandbox.Host
	probe   string
	// nextPort hands out fixed client source ports below the ephemeral range (32768-60999), so
	// a flow made with one is new to every node: no earlier socket ever had its 5-tuple.
	nextPort int
}

func newNPEnv(t *testing.T, ctx context.Context) *npEnv {
	requireE2E(t)
	e := &npEnv{t: t, nextPort: 20000}
	work := t.TempDir()
	var err error
	e.cp = startSandbox(ctx, t, work, sandbox.Options{})
	for i, name := range []string{"node1", "node2"} {
		n, err := e.cp.AddNode(ctx, name, i+1)
		if err != nil {
			t.Fatal(err)
		}
		e.nodes = append(e.nodes, n)
	}
	if e.probe, err = sandbox.BuildProbe(work); err != nil {
		t.Fatal(err)
	}
	bin, err := sandbox.BuildKpr(work)
	if err != nil {
		t.Fatal(err)
	}
	// kpr runs with only the capabilities kpr.service gives it.
	caps, err := sandbox.UnitCaps()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range e.nodes {
		k, err := n.NewKpr(bin)
		if err != nil {
			t.Fatal(err)
		}
		k.Caps = caps
		e.kprs = append(e.kprs, k)
		// Registered after the sandbox's, so it runs first: kpr and its datapath go first.
		t.Cleanup(func() {
			if err := k.Close(); err != nil {
				t.Errorf("kpr on %s: %v", n.Name, err)
			}
		})
	}
	for _, p := range []struct {
		node *sandbox.Node
		name string
		slot int
	}{{e.nodes[0], "np-a", 1}, {e.nodes[0], "np-b", 2}, {e.nodes[1], "np-c", 1}} {
		pod, err := p.node.AddPod(ctx, ns, p.name, p.slot)
		if err != nil {
			t.Fatal(err)
		}
		srv, err := pod.Start(ctx, e.probe, "serve", "--name", p.name, "--tcp", "8080", "--udp", "8080")
		if err != nil {
			t.Fatal(err)
		}
		e.pods = append(e.pods, pod)
		e.servers = append(e.servers, srv)
	}
	for _, p := range e.pods {
		for _, proto := range []string{"tcp", "udp"} {
			out, err := p.Node.Exec(ctx, 0, e.probe, "ready", "--proto", proto, "--target", target(p.IPv4, 8080), "--timeout", "10s")
			if err != nil {
				t.Fatalf("server in %s not ready: %v %s", p.Name, err, out)
			}
		}
	}
	if e.host, err = e.cp.AddExternalHost(ctx, "client", 0); err != nil {
		t.Fatal(err)
	}
	for _, k := range e.kprs {
		if err := k.Start(ctx, 30*time.Second); err != nil {
			t.Fatalf("kpr on %s: %v", k.Node.Name, err)
		}
	}
	return e
}

// diagnostics logs what each kpr thinks it serves and what is attached to eth0. Call it
// while kpr runs: processes started with the test's context stop when it is cancelled.
func (e *npEnv) diagnostics() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, k := range e.kprs {
		for _, args := range [][]string{{"status"}, {"service", "list"}} {
			out, err := k.Run(ctx, args...)
			e.t.Logf("diagnostics: kpr %s on %s (%v):\n%s", strings.Join(args, " "), k.Node.Name, err, out)
		}
		// bpftool before 7.3 does not show tcx attachments; kpr pins one link per attachment.
		var links []string
		ents, err := os.ReadDir(filepath.Join(k.PinDir, "links"))
		for _, l := range ents {
			links = append(links, l.Name())
		}
		e.t.Logf("diagnostics: links pinned by kpr on %s: %v %v", k.Node.Name, links, err)
		if m, err := bpf.OpenNodePortMaps(k.PinDir); err != nil {
			e.t.Logf("diagnostics: north-south counters on %s: %v", k.Node.Name, err)
		} else {
			st, err := m.Stats()
			m.Close()
			e.t.Logf("diagnostics: north-south counters on %s: %+v %v", k.Node.Name, st, err)
		}
		if k.Proc != nil {
			e.t.Logf("diagnostics: kpr log on %s (%s), tail:\n%s", k.Node.Name, k.Proc.LogPath, k.Proc.LogTail(3000))
		}
	}
	// What reached each pod: "tcp <client as seen> -> <pod address>" per request.
	for i, p := range e.servers {
		e.t.Logf("diagnostics: probe serve in %s (%s on %s), last lines:\n%s", e.pods[i].Name, e.pods[i].IPv4, e.pods[i].Node.Name, p.LogTail(600))
	}
}

// hostProbe runs `probe client` in the external host's namespace (in the test's own cgroup, so
// no socket hook of any kpr applies: it is outside the cluster) and returns one result per
// attempt.
func (e *npEnv) hostProbe(args ...string) ([]result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := e.host.Exec(ctx, 0, e.probe, append([]string{"client"}, args...)...)
	if err != nil {
		return nil, fmt.Errorf("probe client %v on host %s: %v\n%s", args, e.host.Name, err, out)
	}
	return parseResults(out)
}

// attempts makes count attempts (each a new socket, a random source port) from the host.
func (e *npEnv) attempts(t *testing.T, proto string, dst netip.AddrPort, count int) []result {
	t.Helper()
	rs, err := e.hostProbe("--target", dst.String(), "--proto", proto, "--count", strconv.Itoa(count), "--timeout", "1s")
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != count {
		t.Fatalf("probe client printed %d results, want %d", len(rs), count)
	}
	return rs
}

// fromPort makes one attempt from the host with a fixed source port.
func (e *npEnv) fromPort(t *testing.T, proto string, dst netip.AddrPort, srcPort int) result {
	t.Helper()
	rs, err := e.hostProbe("--target", dst.String(), "--proto", proto, "--local-port", strconv.Itoa(srcPort), "--timeout", "1s")
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 1 {
		t.Fatalf("probe client printed %d results, want 1", len(rs))
	}
	return rs[0]
}

func (e *npEnv) freshPort() int {
	e.nextPort++
	if e.nextPort >= 32768 {
		e.t.Fatal("out of fixed source ports below the ephemeral range")
	}
	return e.nextPort
}

// flow names what the user did, for messages: "tcp from client 198.18.0.200 to 198.18.0.11:30080 (node1)".
func (e *npEnv) flow(proto string, dst netip.AddrPort, via string) string {
	return fmt.Sprintf("%s from external host %s %s to %s (%s)", proto, e.host.Name, e.host.IPv4, dst, via)
}

// serveWithin retries one attempt until it is answered; the error says what the host saw last.
func (e *npEnv) serveWithin(proto string, dst netip.AddrPort, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		rs, err := e.hostProbe("--target", dst.String(), "--proto", proto, "--timeout", "1s")
		if err != nil {
			return err
		}
		if len(rs) == 1 && rs[0].OK {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not answered within %s; last attempt: %s", timeout, summary(rs))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// summary says what the host observed over a set of attempts.
func summary(rs []result) string {
	by, seen, failed := map[string]int{}, map[string]int{}, map[string]int{}
	for _, r := range rs {
		if r.OK {
			by[r.Backend]++
			seen[addrOnly(r.SeenAs)]++
			continue
		}
		why := r.Errno
		if why == "" {
			why = r.Err
		}
		failed[why]++
	}
	s := fmt.Sprintf("%d of %d answered", len(rs)-sum(failed), len(rs))
	if len(by) > 0 {
		s += fmt.Sprintf(" (by %s; the pods saw the client as %s)", counts(by), counts(seen))
	}
	if len(failed) > 0 {
		s += fmt.Sprintf(", %d failed (%s", sum(failed), counts(failed))
		for _, r := range rs {
			if !r.OK && r.Err != "" {
				s += "; e.g. " + r.Err
				break
			}
		}
		s += ")"
	}
	return s
}

func counts(m map[string]int) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s×%d", k, m[k]))
	}
	return strings.Join(parts, " ")
}

func sum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

func addrOnly(hostPort string) string {
	ap, err := netip.ParseAddrPort(hostPort)
	if err != nil {
		return hostPort
	}
	return ap.Addr().String()
}

// checkServed: every attempt answered, by exactly the pods in want, each pod seeing the client
// as seenAs (the SNAT address of the node that received the flow), each answer from dst.
func checkServed(rs []result, dst netip.AddrPort, want []string, seenAs netip.Addr) error {
	var problems []string
	if f := failures(rs); len(f) > 0 {
		problems = append(problems, fmt.Sprintf("%d attempts failed", len(f)))
	}
	if got := slices.Sorted(maps.Keys(backends(rs))); !slices.Equal(got, want) {
		problems = append(problems, fmt.Sprintf("answered by %v, want every one of %v", got, want))
	}
	for _, r := range rs {
		if r.OK && addrOnly(r.SeenAs) != seenAs.String() {
			problems = append(problems, fmt.Sprintf("a pod saw the client as %s, want %s (SNAT to the node's address)", r.SeenAs, seenAs))
			break
		}
	}
	for _, r := range rs {
		if r.OK && r.Peer != dst.String() {
			problems = append(problems, fmt.Sprintf("an answer came from %s, want %s", r.Peer, dst))
			break
		}
	}
	if len(problems) == 0 {
		return nil
	}
	return fmt.Errorf("%s: %s", strings.Join(problems, "; "), summary(rs))
}

func nodePortOf(t *testing.T, svc *v1.Service, proto v1.Protocol) uint16 {
	t.Helper()
	for _, p := range svc.Spec.Ports {
		if p.Protocol == proto && p.NodePort > 0 {
			return uint16(p.NodePort)
		}
	}
	t.Fatalf("service %s has no %s nodePort: %+v", svc.Name, proto, svc.Spec.Ports)
	return 0
}

// npService is a dual-stack Service of type typ with TCP 80 and UDP 80 to the pods' 8080, and
// its EndpointSlices (both families) with the given pods.
func (e *npEnv) npService(ctx context.Context, name string, typ v1.ServiceType, mutate func(*v1.Service), pods ...*sandbox.Pod) *v1.Service {
	e.t.Helper()
	svc := service(name,
		v1.ServicePort{Name: "tcp", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: v1.ProtocolTCP},
		v1.ServicePort{Name: "udp", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: v1.ProtocolUDP},
	)
	svc.Spec.Type = typ
	if typ != v1.ServiceTypeClusterIP {
		svc.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyCluster
	}
	if mutate != nil {
		mutate(svc)
	}
	api := e.cp.Client
	created, err := api.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatalf("create Service %s: %v", name, err)
	}
	ports := []discovery.EndpointPort{port("tcp", 8080, v1.ProtocolTCP), port("udp", 8080, v1.ProtocolUDP)}
	for _, s := range []*discovery.EndpointSlice{
		slice(name, name+"-v4", discovery.AddressTypeIPv4, ports, pods...),
		slice(name, name+"-v6", discovery.AddressTypeIPv6, ports, pods...),
	} {
		if _, err := api.DiscoveryV1().EndpointSlices(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
			e.t.Fatalf("create EndpointSlice %s: %v", s.Name, err)
		}
	}
	return created
}

func (e *npEnv) setIngress(ctx context.Context, name string, ing ...v1.LoadBalancerIngress) {
	e.t.Helper()
	svcs := e.cp.Client.CoreV1().Services(ns)
	svc, err := svcs.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	svc.Status.LoadBalancer.Ingress = ing
	if _, err := svcs.UpdateStatus(ctx, svc, metav1.UpdateOptions{}); err != nil {
		e.t.Fatalf("Service %s: UpdateStatus with ingress %+v: %v", name, ing, err)
	}
}

func (e *npEnv) routeVia(ctx context.Context, ip netip.Addr, n *sandbox.Node) {
	e.t.Helper()
	if err := e.host.RouteVia(ctx, netip.PrefixFrom(ip, ip.BitLen()), n); err != nil {
		e.t.Fatal(err)
	}
}

// xdpOnNode1 restarts node1's kpr with acceleration native and makes the LAN behave like a
// wire for XDP (see below); the test's cleanup undoes both.
//
// veths differ from NICs in two ways that matter to XDP. A frame sent with XDP_TX reaches the
// bridge only if the veth's other end has an XDP program (sandbox Node.AcceptXDPTx). And a veth's sender leaves TCP and UDP checksums to "the hardware"
// (CHECKSUM_PARTIAL, the field holding only the pseudo-header sum) across bridges and nodes;
// XDP cannot finish such a checksum and leaves those packets to tc. A NIC always delivers
// complete checksums, so TX checksum offload goes off on the host's and the nodes' LAN devices.
func (e *npEnv) xdpOnNode1(ctx context.Context, t *testing.T) {
	t.Helper()
	node1, k := e.nodes[0], e.kprs[0]
	type offload struct {
		what  string
		set   func(sandbox.Offload, bool) error
		o     sandbox.Offload
		wired bool
	}
	offloads := []offload{
		{"the host's eth0", func(o sandbox.Offload, on bool) error { return e.host.SetLANOffload(o, on) }, sandbox.TxChecksum, false},
	}
	for _, n := range e.nodes {
		offloads = append(offloads, offload{n.Name + "'s eth0", func(o sandbox.Offload, on bool) error { return n.SetLANOffload(o, on) }, sandbox.TxChecksum, false})
	}
	if err := node1.AcceptXDPTx(true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := node1.AcceptXDPTx(false); err != nil {
			t.Error(err)
		}
	})
	for _, o := range offloads {
		if err := o.set(o.o, o.wired); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := o.set(o.o, !o.wired); err != nil {
				t.Errorf("restoring %s of %s: %v", o.o.Name, o.what, err)
			}
		})
	}
	restart := func(env []string) error {
		if err := k.Stop(); err != nil {
			return err
		}
		k.Env = env
		return k.Start(ctx, 30*time.Second)
	}
	if err := restart([]string{"KPR_ACCELERATION=native"}); err != nil {
		t.Fatalf("kpr on node1 with acceleration native: %v", err)
	}
	t.Cleanup(func() {
		if err := restart(nil); err != nil {
			t.Errorf("restarting kpr on node1 without XDP: %v", err)
		}
	})
}

// xdpTx is how many packets node1's XDP program has sent back out (kpr's counter).
func (e *npEnv) xdpTx(t *testing.T) uint64 {
	t.Helper()
	m, err := bpf.OpenNodePortMaps(e.kprs[0].PinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	st, err := m.Stats()
	if err != nil {
		t.Fatal(err)
	}
	return st.XDPTx
}

// TestNodePort runs kpr on two nodes of a real cluster and checks, from a host outside the
// cluster on the same LAN, what a user of NodePort, ExternalIP and LoadBalancer Services
// observes: kpr's tc programs (SNAT mode, Maglev) with the default configuration (devices: the
// default route's device, eth0; nodePortAddresses: primary, the node's LAN addresses).
func TestNodePort(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	e := newNPEnv(t, ctx)
	defer func() {
		if t.Failed() {
			e.diagnostics()
		}
	}()
	node1, node2 := e.nodes[0], e.nodes[1]
	allPods := []string{"np-a", "np-b", "np-c"}

	np := e.npService(ctx, "np", v1.ServiceTypeNodePort, nil, e.pods...)
	e.npService(ctx, "ext", v1.ServiceTypeClusterIP, func(s *v1.Service) {
		s.Spec.ExternalIPs = []string{npExternalIP.String()}
	}, e.pods...)
	npPorts := map[string]uint16{"tcp": nodePortOf(t, np, v1.ProtocolTCP), "udp": nodePortOf(t, np, v1.ProtocolUDP)}
	t.Logf("Service np: nodePorts tcp %d udp %d; Service ext: externalIPs %s", npPorts["tcp"], npPorts["udp"], npExternalIP)

	t.Run("NodePort on each node's IPv4 reaches pods on both nodes, SNATed to that node", func(t *testing.T) {
		for _, n := range e.nodes {
			for _, proto := range []string{"tcp", "udp"} {
				dst := netip.AddrPortFrom(n.IPv4, npPorts[proto])
				what := e.flow(proto, dst, "NodePort of "+n.Name)
				if err := e.serveWithin(proto, dst, npProgramWithin); err != nil {
					t.Errorf("%s: %v", what, err)
					continue
				}
				if err := checkServed(e.attempts(t, proto, dst, 30), dst, allPods, n.IPv4); err != nil {
					t.Errorf("%s, 30 attempts: %v", what, err)
				}
			}
		}
	})

	t.Run("ExternalIP is served by whichever node the host routes it to", func(t *testing.T) {
		for _, n := range []*sandbox.Node{node1, node2} {
			e.routeVia(ctx, npExternalIP, n)
			for _, proto := range []string{"tcp", "udp"} {
				dst := netip.AddrPortFrom(npExternalIP, 80)
				what := e.flow(proto, dst, "external IP routed via "+n.Name)
				if err := e.serveWithin(proto, dst, npProgramWithin); err != nil {
					t.Errorf("%s: %v", what, err)
					continue
				}
				if err := checkServed(e.attempts(t, proto, dst, 30), dst, allPods, n.IPv4); err != nil {
					t.Errorf("%s, 30 attempts: %v", what, err)
				}
			}
		}
	})

	t.Run("Maglev sends a flow to the same pod through either node", func(t *testing.T) {
		dst := netip.AddrPortFrom(npExternalIP, 80)
		e.routeVia(ctx, npExternalIP, node1)
		if err := e.serveWithin("udp", dst, npProgramWithin); err != nil {
			t.Fatalf("%s: %v", e.flow("udp", dst, "external IP routed via node1"), err)
		}
		ports := make([]int, 12)
		for i := range ports {
			ports[i] = e.freshPort()
		}
		answered := map[string][]result{} // node -> one result per source port
		for _, n := range []*sandbox.Node{node1, node2} {
			e.routeVia(ctx, npExternalIP, n)
			for _, p := range ports {
				answered[n.Name] = append(answered[n.Name], e.fromPort(t, "udp", dst, p))
			}
		}
		// who says which pod answered one flow through node n, or why none did.
		who := func(n *sandbox.Node, r result) string {
			switch {
			case !r.OK:
				return fmt.Sprintf("no answer via %s (%s)", n.Name, r.Errno)
			case addrOnly(r.SeenAs) != n.IPv4.String():
				// The pod saw another node's SNAT address: the route switch did not happen.
				return fmt.Sprintf("%s via %s, but the pod saw the client as %s", r.Backend, n.Name, r.SeenAs)
			}
			return fmt.Sprintf("%s via %s", r.Backend, n.Name)
		}
		pods := map[string]int{}
		var bad []string
		for i, p := range ports {
			a, b := answered["node1"][i], answered["node2"][i]
			if a.OK {
				pods[a.Backend]++
			}
			wa, wb := who(node1, a), who(node2, b)
			if !a.OK || !b.OK || a.Backend != b.Backend || wa != a.Backend+" via node1" || wb != b.Backend+" via node2" {
				bad = append(bad, fmt.Sprintf("source port %d: %s; %s", p, wa, wb))
			}
		}
		if len(bad) > 0 {
			t.Errorf("the same UDP flow (client %s, to %s) must reach the same pod through node1 and node2; %d of %d source ports did not:\n  %s",
				e.host.IPv4, dst, len(bad), len(ports), strings.Join(bad, "\n  "))
		}
		if len(pods) < 2 && len(bad) == 0 {
			t.Errorf("%d source ports all went to %v: Maglev should spread flows over the 3 pods", len(ports), pods)
		}
		t.Logf("flows per pod over %d source ports: %s", len(ports), counts(pods))
	})

	t.Run("LoadBalancer ingress IP is served, one with ipMode Proxy is not", func(t *testing.T) {
		e.npService(ctx, "lb", v1.ServiceTypeLoadBalancer, nil, e.pods...)
		lbProxy := e.npService(ctx, "lb-proxy", v1.ServiceTypeLoadBalancer, nil, e.pods...)
		// lb-proxy's status first: once lb's (later) ingress is served, kpr has seen both.
		e.setIngress(ctx, "lb-proxy", v1.LoadBalancerIngress{IP: npLBProxyIP.String(), IPMode: ptr.To(v1.LoadBalancerIPModeProxy)})
		e.setIngress(ctx, "lb", v1.LoadBalancerIngress{IP: npLBIP.String(), IPMode: ptr.To(v1.LoadBalancerIPModeVIP)})
		for _, n := range []*sandbox.Node{node1, node2} {
			e.routeVia(ctx, npLBIP, n)
			for _, proto := range []string{"tcp", "udp"} {
				dst := netip.AddrPortFrom(npLBIP, 80)
				what := e.flow(proto, dst, "load-balancer IP (ipMode VIP) routed via "+n.Name)
				if err := e.serveWithin(proto, dst, npProgramWithin); err != nil {
					t.Errorf("%s: %v", what, err)
					continue
				}
				if err := checkServed(e.attempts(t, proto, dst, 20), dst, allPods, n.IPv4); err != nil {
					t.Errorf("%s, 20 attempts: %v", what, err)
				}
			}
		}

		// lb-proxy is programmed (its NodePort answers), but not on its ingress IP.
		pdst := netip.AddrPortFrom(node1.IPv4, nodePortOf(t, lbProxy, v1.ProtocolTCP))
		if err := e.serveWithin("tcp", pdst, npProgramWithin); err != nil {
			t.Fatalf("%s: %v (needed to know kpr has seen lb-proxy)", e.flow("tcp", pdst, "NodePort of lb-proxy on node1"), err)
		}
		e.routeVia(ctx, npLBProxyIP, node1)
		for _, proto := range []string{"tcp", "udp"} {
			dst := netip.AddrPortFrom(npLBProxyIP, 80)
			rs := e.attempts(t, proto, dst, 3)
			if b := backends(rs); len(b) > 0 {
				t.Errorf("%s: %s; want no answer: with ipMode Proxy the load balancer, not the node, serves that address",
					e.flow(proto, dst, "ipMode Proxy ingress routed via node1"), summary(rs))
			}
			for _, r := range rs {
				if !r.OK && r.ElapsedMS > 1500 {
					t.Errorf("%s: an attempt took %.0f ms to fail, want the 1s timeout at most", e.flow(proto, dst, "ipMode Proxy ingress via node1"), r.ElapsedMS)
				}
			}
		}
	})

	t.Run("loadBalancerSourceRanges: other clients are dropped, the NodePort is not filtered", func(t *testing.T) {
		hostRange := netip.PrefixFrom(e.host.IPv4, 32).String()
		ranged := e.npService(ctx, "ranged", v1.ServiceTypeLoadBalancer, func(s *v1.Service) {
			s.Spec.LoadBalancerSourceRanges = []string{"203.0.113.0/24", hostRange}
		}, e.pods...)
		e.setIngress(ctx, "ranged", v1.LoadBalancerIngress{IP: npRangedIP.String()})
		e.routeVia(ctx, npRangedIP, node1)
		dst := netip.AddrPortFrom(npRangedIP, 80)
		for _, proto := range []string{"tcp", "udp"} {
			what := e.flow(proto, dst, "load-balancer IP with the host in its source ranges, via node1")
			if err := e.serveWithin(proto, dst, npProgramWithin); err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			// 30: with three pods, fewer attempts miss one now and then.
			if err := checkServed(e.attempts(t, proto, dst, 30), dst, allPods, node1.IPv4); err != nil {
				t.Errorf("%s, 30 attempts: %v", what, err)
			}
		}

		// The host's range removed: the same frontend drops it (a timeout, not a refusal).
		svcs := e.cp.Client.CoreV1().Services(ns)
		svc, err := svcs.Get(ctx, "ranged", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		svc.Spec.LoadBalancerSourceRanges = []string{"203.0.113.0/24"}
		if _, err := svcs.Update(ctx, svc, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		for _, proto := range []string{"tcp", "udp"} {
			what := e.flow(proto, dst, "load-balancer IP, the host outside its source ranges, via node1")
			dropped := func(r result) error {
				if r.OK || r.Errno != "ETIMEDOUT" {
					return fmt.Errorf("ok %v (backend %q) errno %q, want the attempt dropped", r.OK, r.Backend, r.Errno)
				}
				return nil
			}
			eventually(t, npProgramWithin, what+" is dropped", func() error {
				return dropped(e.attempts(t, proto, dst, 1)[0])
			})
			for i, r := range e.attempts(t, proto, dst, 3) {
				if err := dropped(r); err != nil {
					t.Errorf("%s, attempt %d: %v", what, i, err)
				}
			}
		}
		// kube-proxy: a NodePort bypasses loadBalancerSourceRanges.
		ndst := netip.AddrPortFrom(node1.IPv4, nodePortOf(t, ranged, v1.ProtocolTCP))
		if err := checkServed(e.attempts(t, "tcp", ndst, 30), ndst, allPods, node1.IPv4); err != nil {
			t.Errorf("%s: %v", e.flow("tcp", ndst, "NodePort of ranged on node1"), err)
		}
	})

	t.Run("a removed endpoint gets no new connections through either node", func(t *testing.T) {
		const gone = "np-b"
		slices4 := e.cp.Client.DiscoveryV1().EndpointSlices(ns)
		s, err := slices4.Get(ctx, "np-v4", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.Endpoints = slices.DeleteFunc(s.Endpoints, func(ep discovery.Endpoint) bool { return ep.TargetRef.Name == gone })
		if len(s.Endpoints) != 2 {
			t.Fatalf("np-v4 has %d endpoints after removing %s, want 2", len(s.Endpoints), gone)
		}
		if _, err := slices4.Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		left := []string{"np-a", "np-c"}
		// TCP connections are new flows every time (random source port, TIME_WAIT keeps it
		// from coming back soon); wait until neither node sends one to the removed pod.
		deadline := time.Now().Add(npProgramWithin)
		for {
			var errs []string
			for _, n := range e.nodes {
				dst := netip.AddrPortFrom(n.IPv4, npPorts["tcp"])
				if err := checkServed(e.attempts(t, "tcp", dst, 10), dst, left, n.IPv4); err != nil {
					errs = append(errs, fmt.Sprintf("%s: %v", e.flow("tcp", dst, "NodePort of "+n.Name), err))
				}
			}
			if len(errs) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s was removed from EndpointSlice np-v4 %s ago; still:\n  %s", gone, npProgramWithin, strings.Join(errs, "\n  "))
			}
			time.Sleep(200 * time.Millisecond)
		}
		for _, n := range e.nodes {
			dst := netip.AddrPortFrom(n.IPv4, npPorts["tcp"])
			if err := checkServed(e.attempts(t, "tcp", dst, 30), dst, left, n.IPv4); err != nil {
				t.Errorf("after removing %s: %s, 30 new connections: %v", gone, e.flow("tcp", dst, "NodePort of "+n.Name), err)
			}
			// UDP from source ports never used before: new flows for certain.
			udst := netip.AddrPortFrom(n.IPv4, npPorts["udp"])
			var rs []result
			for range 20 {
				rs = append(rs, e.fromPort(t, "udp", udst, e.freshPort()))
			}
			if err := checkServed(rs, udst, left, n.IPv4); err != nil {
				t.Errorf("after removing %s: %s, 20 new flows (fresh source ports): %v", gone, e.flow("udp", udst, "NodePort of "+n.Name), err)
			}
		}
	})

	t.Run("externalTrafficPolicy Local: local pods only, the client's own address kept", func(t *testing.T) {
		local := e.npService(ctx, "local", v1.ServiceTypeNodePort, func(s *v1.Service) {
			s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
		}, e.pods...)
		onlyNode1 := e.npService(ctx, "local-node1", v1.ServiceTypeNodePort, func(s *v1.Service) {
			s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
		}, e.pods[0], e.pods[1])
		localPods := map[string][]string{"node1": {"np-a", "np-b"}, "node2": {"np-c"}}
		for _, n := range e.nodes {
			for _, proto := range []string{"tcp", "udp"} {
				for _, fam := range []struct{ node, client netip.Addr }{{n.IPv4, e.host.IPv4}, {n.IPv6, e.host.IPv6}} {
					p := v1.ProtocolTCP
					if proto == "udp" {
						p = v1.ProtocolUDP
					}
					dst := netip.AddrPortFrom(fam.node, nodePortOf(t, local, p))
					what := e.flow(proto, dst, "NodePort (Local) of "+n.Name)
					if err := e.serveWithin(proto, dst, npProgramWithin); err != nil {
						t.Errorf("%s: %v", what, err)
						continue
					}
					if err := checkServed(e.attempts(t, proto, dst, 20), dst, localPods[n.Name], fam.client); err != nil {
						t.Errorf("%s, 20 attempts: %v", what, err)
					}
				}
			}
		}
		// node1 serves local-node1; node2 has no local endpoint and drops.
		dst1 := netip.AddrPortFrom(node1.IPv4, nodePortOf(t, onlyNode1, v1.ProtocolTCP))
		if err := e.serveWithin("tcp", dst1, npProgramWithin); err != nil {
			t.Fatalf("%s: %v", e.flow("tcp", dst1, "NodePort (Local) of node1"), err)
		}
		dst2 := netip.AddrPortFrom(node2.IPv4, dst1.Port())
		rs := e.attempts(t, "tcp", dst2, 3)
		for _, r := range rs {
			// Dropped, as kube-proxy drops it, not refused: the Service has endpoints.
			if r.OK || r.Errno != "ETIMEDOUT" {
				t.Errorf("%s: %s; want every attempt dropped: node2 has no local endpoint of local-node1", e.flow("tcp", dst2, "NodePort (Local) of node2"), summary(rs))
				break
			}
		}
	})

	t.Run("DSR (kpr.dev/forwarding-mode: dsr): pods on both nodes see the client; answers come from the frontend", func(t *testing.T) {
		dsr := e.npService(ctx, "dsr", v1.ServiceTypeNodePort, func(s *v1.Service) {
			s.Annotations = map[string]string{"kpr.dev/forwarding-mode": "dsr"}
		}, e.pods...)
		for _, n := range e.nodes {
			for _, proto := range []string{"tcp", "udp"} {
				p := v1.ProtocolTCP
				if proto == "udp" {
					p = v1.ProtocolUDP
				}
				for _, fam := range []struct{ node, client netip.Addr }{{n.IPv4, e.host.IPv4}, {n.IPv6, e.host.IPv6}} {
					dst := netip.AddrPortFrom(fam.node, nodePortOf(t, dsr, p))
					what := e.flow(proto, dst, "DSR NodePort of "+n.Name)
					if err := e.serveWithin(proto, dst, npProgramWithin); err != nil {
						t.Errorf("%s: %v", what, err)
						continue
					}
					// The pod on the other node answers through its own node: only the
					// option in the flow's first packet tells that node the frontend.
					if err := checkServed(e.attempts(t, proto, dst, 30), dst, allPods, fam.client); err != nil {
						t.Errorf("%s, 30 attempts: %v", what, err)
					}
				}
			}
		}
		for i, k := range e.kprs {
			status, err := k.Run(ctx, "status")
			if err != nil || !strings.Contains(status, "DSR packets from other nodes") {
				t.Errorf("kpr status on %s does not count the DSR flows it answered for another node: %v\n%s", e.nodes[i].Name, err, status)
			}
		}
	})

	t.Run("hybrid (kpr.dev/forwarding-mode: hybrid): TCP by DSR, UDP SNATed", func(t *testing.T) {
		hy := e.npService(ctx, "hybrid", v1.ServiceTypeNodePort, func(s *v1.Service) {
			s.Annotations = map[string]string{"kpr.dev/forwarding-mode": "hybrid"}
		}, e.pods...)
		for _, n := range e.nodes {
			for _, c := range []struct {
				proto  string
				p      v1.Protocol
				seenAs netip.Addr
			}{{"tcp", v1.ProtocolTCP, e.host.IPv4}, {"udp", v1.ProtocolUDP, n.IPv4}} {
				dst := netip.AddrPortFrom(n.IPv4, nodePortOf(t, hy, c.p))
				what := e.flow(c.proto, dst, "hybrid NodePort of "+n.Name)
				if err := e.serveWithin(c.proto, dst, npProgramWithin); err != nil {
					t.Errorf("%s: %v", what, err)
					continue
				}
				if err := checkServed(e.attempts(t, c.proto, dst, 30), dst, allPods, c.seenAs); err != nil {
					t.Errorf("%s, 30 attempts: %v", what, err)
				}
			}
		}
	})

	t.Run("healthCheckNodePort answers 200 on the node with local endpoints, 503 on the other", func(t *testing.T) {
		svc := e.npService(ctx, "lb-local", v1.ServiceTypeLoadBalancer, func(s *v1.Service) {
			s.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyLocal
		}, e.pods[0], e.pods[1])
		hc := uint16(svc.Spec.HealthCheckNodePort)
		if hc == 0 {
			t.Fatalf("the API server allocated no healthCheckNodePort: %+v", svc.Spec)
		}
		client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: e.host.DialContext, DisableKeepAlives: true}}
		type answer struct {
			code int
			body struct {
				Service struct {
					Namespace, Name string
				} `json:"service"`
				LocalEndpoints      int  `json:"localEndpoints"`
				ServiceProxyHealthy bool `json:"serviceProxyHealthy"`
			}
		}
		get := func(a netip.Addr) (answer, error) {
			var ans answer
			resp, err := client.Get("http://" + netip.AddrPortFrom(a, hc).String() + "/healthz")
			if err != nil {
				return ans, err
			}
			defer resp.Body.Close()
			ans.code = resp.StatusCode
			b, err := io.ReadAll(resp.Body)
			if err != nil {
				return ans, err
			}
			if err := json.Unmarshal(b, &ans.body); err != nil {
				return ans, fmt.Errorf("%w: %q", err, b)
			}
			return ans, nil
		}
		for _, c := range []struct {
			addr      netip.Addr
			code, eps int
		}{{node1.IPv4, 200, 2}, {node1.IPv6, 200, 2}, {node2.IPv4, 503, 0}, {node2.IPv6, 503, 0}} {
			var last answer
			what := fmt.Sprintf("GET %s from %s answers %d with localEndpoints %d", netip.AddrPortFrom(c.addr, hc), e.host.Name, c.code, c.eps)
			eventually(t, npProgramWithin, what, func() error {
				var err error
				if last, err = get(c.addr); err != nil {
					return err
				}
				if last.code != c.code || last.body.LocalEndpoints != c.eps {
					return fmt.Errorf("got %+v", last)
				}
				return nil
			})
			if last.body.Service.Namespace != ns || last.body.Service.Name != "lb-local" || !last.body.ServiceProxyHealthy {
				t.Errorf("GET %s: body %+v", netip.AddrPortFrom(c.addr, hc), last.body)
			}
		}
		status, err := e.kprs[0].Run(ctx, "status")
		if err != nil || !strings.Contains(status, "healthCheckNodePorts served") {
			t.Errorf("kpr status on node1 does not show the health check port: %v\n%s", err, status)
		}
	})

	t.Run("a Service without endpoints is refused at once: TCP RST, ICMP port unreachable", func(t *testing.T) {
		// An external IP, not a node port: the node itself would refuse a port of its own
		// address that nothing listens on, but it drops what it would have to forward to
		// 198.51.100.30, so only kpr's answer can make the connection fail at once.
		e.npService(ctx, "empty", v1.ServiceTypeClusterIP, func(s *v1.Service) {
			s.Spec.ExternalIPs = []string{npEmptyIP.String()}
		})
		e.routeVia(ctx, npEmptyIP, node1)
		dst := netip.AddrPortFrom(npEmptyIP, 80)
		for _, proto := range []string{"tcp", "udp"} {
			what := e.flow(proto, dst, "ExternalIP without endpoints, via node1")
			refused := func(r result) error {
				if r.OK || r.Errno != "ECONNREFUSED" || r.ElapsedMS > 500 {
					return fmt.Errorf("ok %v errno %q %s after %.0f ms, want ECONNREFUSED at once", r.OK, r.Errno, r.Err, r.ElapsedMS)
				}
				return nil
			}
			eventually(t, npProgramWithin, what+" is refused", func() error {
				return refused(e.attempts(t, proto, dst, 1)[0])
			})
			for i, r := range e.attempts(t, proto, dst, 5) {
				if err := refused(r); err != nil {
					t.Errorf("%s, attempt %d: %v", what, i, err)
				}
			}
		}
	})

	t.Run("ping to an external or load-balancer IP with endpoints is answered, without endpoints not", func(t *testing.T) {
		for _, ip := range []netip.Addr{npExternalIP, npLBIP} {
			e.routeVia(ctx, ip, node1)
			dst := netip.AddrPortFrom(ip, 0)
			for i, r := range e.attempts(t, "icmp", dst, 3) {
				if !r.OK || r.Peer != ip.String() {
					t.Errorf("ping %s via node1, attempt %d: ok %v from %q (%s %s), want a reply from %s", ip, i, r.OK, r.Peer, r.Errno, r.Err, ip)
				}
			}
		}
		// "empty" has no endpoints: its address is not answered (a timeout).
		e.routeVia(ctx, npEmptyIP, node1)
		for i, r := range e.attempts(t, "icmp", netip.AddrPortFrom(npEmptyIP, 0), 2) {
			if r.OK {
				t.Errorf("ping %s (no endpoints) via node1, attempt %d: answered by %s, want no reply", npEmptyIP, i, r.Peer)
			}
		}
	})

	t.Run("a long-lived connection keeps its pod while an unrelated endpoint is removed", func(t *testing.T) {
		stream := e.npService(ctx, "stream", v1.ServiceTypeNodePort, nil, e.pods...)
		dst := netip.AddrPortFrom(node1.IPv4, nodePortOf(t, stream, v1.ProtocolTCP))
		if err := e.serveWithin("tcp", dst, npProgramWithin); err != nil {
			t.Fatalf("%s: %v", e.flow("tcp", dst, "NodePort of stream on node1"), err)
		}
		// Which pod the connection lands on: the one whose server logs a new TCP connection.
		accepted := func() []int {
			n := make([]int, len(e.servers))
			for i, p := range e.servers {
				data, _ := os.ReadFile(p.LogPath)
				n[i] = strings.Count(string(data), " -> ") // "tcp <peer> -> <local>" per connection
			}
			return n
		}
		before := accepted()
		type out struct {
			rs  []result
			err error
		}
		done := make(chan out, 1)
		const requests = 80 // 50 ms apart: about 4 s on one connection
		go func() {
			rs, err := e.hostProbe("--target", dst.String(), "--proto", "tcp", "--reuse",
				"--count", strconv.Itoa(requests), "--interval", "50ms", "--timeout", "2s")
			done <- out{rs, err}
		}()
		holder := -1
		eventually(t, 5*time.Second, "the long-lived connection reaches a pod", func() error {
			for i, n := range accepted() {
				if n > before[i] {
					holder = i
					return nil
				}
			}
			return errors.New("no pod logged a new connection")
		})
		gone := e.pods[(holder+1)%len(e.pods)].Name
		slices4 := e.cp.Client.DiscoveryV1().EndpointSlices(ns)
		sl, err := slices4.Get(ctx, "stream-v4", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		sl.Endpoints = slices.DeleteFunc(sl.Endpoints, func(ep discovery.Endpoint) bool { return ep.TargetRef.Name == gone })
		if _, err := slices4.Update(ctx, sl, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		res := <-done
		if res.err != nil {
			t.Fatal(res.err)
		}
		if len(res.rs) != requests {
			t.Fatalf("%d results on the long-lived connection, want %d: %s", len(res.rs), requests, summary(res.rs))
		}
		for i, r := range res.rs {
			if !r.OK || r.Backend != e.pods[holder].Name {
				t.Fatalf("request %d on the long-lived connection (held by %s; %s removed meanwhile): ok %v backend %q %s",
					i, e.pods[holder].Name, gone, r.OK, r.Backend, r.Err)
			}
		}
		// New connections stop reaching the removed pod.
		left := slices.DeleteFunc(slices.Clone(allPods), func(p string) bool { return p == gone })
		eventually(t, npProgramWithin, "new connections avoid "+gone, func() error {
			return checkServed(e.attempts(t, "tcp", dst, 20), dst, left, node1.IPv4)
		})
	})

	t.Run("sessionAffinity ClientIP: every new connection from the host goes to the same pod", func(t *testing.T) {
		sticky := e.npService(ctx, "sticky", v1.ServiceTypeNodePort, func(s *v1.Service) {
			s.Spec.SessionAffinity = v1.ServiceAffinityClientIP
		}, e.pods...)
		for _, n := range e.nodes {
			dst := netip.AddrPortFrom(n.IPv4, nodePortOf(t, sticky, v1.ProtocolTCP))
			what := e.flow("tcp", dst, "NodePort of sticky (ClientIP affinity) on "+n.Name)
			if err := e.serveWithin("tcp", dst, npProgramWithin); err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			rs := e.attempts(t, "tcp", dst, 20)
			if b := backends(rs); len(failures(rs)) > 0 || len(b) != 1 {
				t.Errorf("%s, 20 new connections: %s; want every one answered by one pod", what, summary(rs))
			}
		}
	})

	t.Run("kube-proxy's health server on :10256: 200, 503 while the node is tainted ToBeDeletedByClusterAutoscaler", func(t *testing.T) {
		client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: e.host.DialContext, DisableKeepAlives: true}}
		probe := func(path string) (int, map[string]any, error) {
			resp, err := client.Get("http://" + netip.AddrPortFrom(node1.IPv4, 10256).String() + path)
			if err != nil {
				return 0, nil, err
			}
			defer resp.Body.Close()
			var body map[string]any
			err = json.NewDecoder(resp.Body).Decode(&body)
			return resp.StatusCode, body, err
		}
		waitFor := func(path string, want int) map[string]any {
			t.Helper()
			deadline := time.Now().Add(npProgramWithin)
			for {
				code, body, err := probe(path)
				if err == nil && code == want {
					return body
				}
				if time.Now().After(deadline) {
					t.Fatalf("GET %s on node1: %d %v %v, want %d", path, code, body, err, want)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		if body := waitFor("/healthz", 200); body["nodeEligible"] != true || body["healthy"] != true {
			t.Errorf("/healthz: %v, want healthy and nodeEligible", body)
		}
		nodes := e.cp.Client.CoreV1().Nodes()
		taint := func(on bool) {
			t.Helper()
			n, err := nodes.Get(ctx, node1.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			n.Spec.Taints = nil
			if on {
				n.Spec.Taints = []v1.Taint{{Key: "ToBeDeletedByClusterAutoscaler", Value: "1", Effect: v1.TaintEffectNoSchedule}}
			}
			if _, err := nodes.Update(ctx, n, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		taint(true)
		defer taint(false)
		if body := waitFor("/healthz", 503); body["nodeEligible"] != false {
			t.Errorf("/healthz of a tainted node: %v, want nodeEligible false", body)
		}
		waitFor("/livez", 200) // the proxy itself is fine
		taint(false)
		waitFor("/healthz", 200)
	})

	t.Run("metrics on 127.0.0.1:10249 under kube-proxy's names", func(t *testing.T) {
		client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: node1.DialContext, DisableKeepAlives: true}}
		resp, err := client.Get("http://127.0.0.1:10249/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		values := map[string]float64{}
		for _, line := range strings.Split(string(body), "\n") {
			if f := strings.Fields(line); len(f) == 2 && !strings.HasPrefix(line, "#") {
				v, _ := strconv.ParseFloat(f[1], 64)
				values[f[0]] = v
			}
		}
		for _, m := range []string{"kubeproxy_sync_proxy_rules_duration_seconds_count", "kubeproxy_sync_proxy_rules_last_timestamp_seconds", "kpr_datapath_frontends", "kpr_datapath_backends"} {
			if values[m] <= 0 {
				t.Errorf("%s = %v, want > 0 (node1 has synced its Services)", m, values[m])
			}
		}
		if last := values["kubeproxy_sync_proxy_rules_last_timestamp_seconds"]; last > 0 && time.Since(time.Unix(int64(last), 0)) > 2*time.Minute {
			t.Errorf("last sync at %v, long ago", time.Unix(int64(last), 0))
		}
	})

	t.Run("guard: a kube-proxy pod on node1 is reported in kpr status and a Node Event, and cleared when it goes", func(t *testing.T) {
		pods := e.cp.Client.CoreV1().Pods("kube-system")
		pod := &v1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "kube-proxy-x7k2p", Namespace: "kube-system", Labels: map[string]string{"k8s-app": "kube-proxy"}},
			Spec: v1.PodSpec{NodeName: node1.Name, TerminationGracePeriodSeconds: ptr.To[int64](0),
				Containers: []v1.Container{{Name: "kube-proxy", Image: "registry.k8s.io/kube-proxy:v1.36.3"}}},
		}
		created, err := pods.Create(ctx, pod, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		created.Status.Phase = v1.PodRunning
		if _, err := pods.UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		status := func(i int) string {
			out, err := e.kprs[i].Run(ctx, "status")
			if err != nil {
				t.Fatalf("kpr status on %s: %v\n%s", e.nodes[i].Name, err, out)
			}
			return out
		}
		eventually(t, npProgramWithin, "kpr status on node1 warns about kube-proxy", func() error {
			if out := status(0); !strings.Contains(out, "WARNING:") || !strings.Contains(out, "kube-system/kube-proxy-x7k2p") {
				return fmt.Errorf("no warning:\n%s", out)
			}
			return nil
		})
		if out := status(1); strings.Contains(out, "WARNING:") {
			t.Errorf("node2, which runs no kube-proxy, warns:\n%s", out)
		}
		eventually(t, npProgramWithin, "a Warning Event on node1", func() error {
			evs, err := e.cp.Client.CoreV1().Events("default").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + node1.Name + ",reason=KubeProxyRunning"})
			if err != nil || len(evs.Items) == 0 {
				return fmt.Errorf("none: %v", err)
			}
			if ev := evs.Items[0]; ev.Type != v1.EventTypeWarning || ev.InvolvedObject.Kind != "Node" || !strings.Contains(ev.Message, "kube-proxy-x7k2p") {
				return fmt.Errorf("event %+v", ev)
			}
			return nil
		})
		if err := pods.Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil {
			t.Fatal(err)
		}
		eventually(t, npProgramWithin, "the warning goes with the pod", func() error {
			if out := status(0); strings.Contains(out, "WARNING:") {
				return fmt.Errorf("still:\n%s", out)
			}
			return nil
		})
	})

	t.Run("acceleration native: node1's XDP program sends flows to a pod on node2 straight back out of eth0", func(t *testing.T) {
		e.xdpOnNode1(ctx, t)
		xs := e.npService(ctx, "xdp", v1.ServiceTypeNodePort, nil, e.pods[2]) // np-c, on node2
		status, err := e.kprs[0].Run(ctx, "status")
		if err != nil || !strings.Contains(status, "XDP: eth0 native") {
			t.Fatalf("kpr status on node1 does not show native XDP on eth0: %v\n%s", err, status)
		}
		before := e.xdpTx(t)
		attempts := 0
		for _, proto := range []string{"tcp", "udp"} {
			p := v1.ProtocolTCP
			if proto == "udp" {
				p = v1.ProtocolUDP
			}
			for _, node := range []netip.Addr{node1.IPv4, node1.IPv6} {
				dst := netip.AddrPortFrom(node, nodePortOf(t, xs, p))
				what := e.flow(proto, dst, "NodePort of node1 with native XDP")
				if err := e.serveWithin(proto, dst, npProgramWithin); err != nil {
					t.Errorf("%s: %v", what, err)
					continue
				}
				if err := checkServed(e.attempts(t, proto, dst, 30), dst, []string{"np-c"}, node); err != nil {
					t.Errorf("%s, 30 attempts: %v", what, err)
				}
				attempts += 30
			}
		}
		// Each attempt's request and answer cross node1 twice each way (to np-c and back):
		// every one of those packets leaves by eth0, where it came in, so XDP sends it.
		if sent := e.xdpTx(t) - before; sent < uint64(2*attempts) {
			t.Errorf("node1's XDP program sent %d packets for %d answered attempts; want at least %d (a request and an answer each)", sent, attempts, 2*attempts)
		}
	})

	t.Run("IPv6 NodePort on each node's IPv6 address", func(t *testing.T) {
		// np is dual-stack; its IPv6 slice still has all three pods.
		for _, n := range e.nodes {
			for _, proto := range []string{"tcp", "udp"} {
				dst := netip.AddrPortFrom(n.IPv6, npPorts[proto])
				what := fmt.Sprintf("%s from external host %s %s to %s (NodePort of %s)", proto, e.host.Name, e.host.IPv6, dst, n.Name)
				if err := e.serveWithin(proto, dst, npProgramWithin); err != nil {
					t.Errorf("%s: %v", what, err)
					continue
				}
				if err := checkServed(e.attempts(t, proto, dst, 30), dst, allPods, n.IPv6); err != nil {
					t.Errorf("%s, 30 attempts: %v", what, err)
				}
			}
		}
	})
}
