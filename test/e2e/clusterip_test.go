package e2e

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/kpr-dev/kpr/bpf"
	"github.com/kpr-dev/kpr/node/agent"
	"github.com/kpr-dev/kpr/test/sandbox"
)

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

const ns = "default"

func service(name string, ports ...v1.ServicePort) *v1.Service {
	return &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: v1.ServiceSpec{
			Type:           v1.ServiceTypeClusterIP,
			IPFamilyPolicy: ptr.To(v1.IPFamilyPolicyRequireDualStack),
			IPFamilies:     []v1.IPFamily{v1.IPv4Protocol, v1.IPv6Protocol},
			Ports:          ports,
		},
	}
}

// slice is an EndpointSlice of service svc for one address family, with the given pods as
// ready endpoints on their nodes.
func slice(svc, name string, family discovery.AddressType, ports []discovery.EndpointPort, pods ...*sandbox.Pod) *discovery.EndpointSlice {
	s := &discovery.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name:      name,
			Namespace: ns,
			Labels:    map[string]string{discovery.LabelServiceName: svc, discovery.LabelManagedBy: "kpr-e2e"},
		},
		AddressType: family,
		Ports:       ports,
	}
	for _, p := range pods {
		addr := p.IPv4
		if family == discovery.AddressTypeIPv6 {
			addr = p.IPv6
		}
		s.Endpoints = append(s.Endpoints, discovery.Endpoint{
			Addresses:  []string{addr.String()},
			Conditions: discovery.EndpointConditions{Ready: ptr.To(true)},
			NodeName:   ptr.To(p.Node.Name),
			TargetRef:  &v1.ObjectReference{Kind: "Pod", Namespace: p.Namespace, Name: p.Name},
		})
	}
	return s
}

func port(name string, p int32, proto v1.Protocol) discovery.EndpointPort {
	return discovery.EndpointPort{Name: ptr.To(name), Port: ptr.To(p), Protocol: ptr.To(proto)}
}

func vips(t *testing.T, svc *v1.Service) (v4, v6 netip.Addr) {
	t.Helper()
	for _, s := range svc.Spec.ClusterIPs {
		a := netip.MustParseAddr(s)
		if a.Is4() {
			v4 = a
		} else {
			v6 = a
		}
	}
	if !v4.IsValid() || !v6.IsValid() {
		t.Fatalf("service %s has ClusterIPs %v, want one per family", svc.Name, svc.Spec.ClusterIPs)
	}
	return v4, v6
}

func target(a netip.Addr, p uint16) string { return netip.AddrPortFrom(a, p).String() }

// TestClusterIP runs kpr on a node of a real cluster (etcd + kube-apiserver) and checks, from
// client processes in a pod and on the node, what a user of ClusterIP Services observes.
func TestClusterIP(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	e := newEnv(t, ctx)
	api := e.cp.Client

	var webPods []*sandbox.Pod
	for i, name := range []string{"web-a", "web-b"} {
		p, err := e.node.AddPod(ctx, ns, name, 2+i)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.Start(ctx, e.probe, "serve", "--name", name, "--tcp", "8080", "--udp", "5353"); err != nil {
			t.Fatal(err)
		}
		webPods = append(webPods, p)
	}
	client, err := e.node.AddPod(ctx, ns, "client", 9)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range webPods {
		out, err := e.node.Exec(ctx, 0, e.probe, "ready", "--target", target(p.IPv4, 8080), "--timeout", "10s")
		if err != nil {
			t.Fatalf("server in %s not ready: %v %s", p.Name, err, out)
		}
	}

	e.startKpr(ctx)

	// A dual-stack Service with a named target port and a UDP port, and its two slices.
	web, err := api.CoreV1().Services(ns).Create(ctx, service("web",
		v1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromString("http"), Protocol: v1.ProtocolTCP},
		v1.ServicePort{Name: "dns", Port: 53, TargetPort: intstr.FromInt32(5353), Protocol: v1.ProtocolUDP},
	), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ports := []discovery.EndpointPort{port("http", 8080, v1.ProtocolTCP), port("dns", 5353, v1.ProtocolUDP)}
	for _, s := range []*discovery.EndpointSlice{
		slice("web", "web-v4", discovery.AddressTypeIPv4, ports, webPods...),
		slice("web", "web-v6", discovery.AddressTypeIPv6, ports, webPods...),
	} {
		if _, err := api.DiscoveryV1().EndpointSlices(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	vip4, vip6 := vips(t, web)
	eventually(t, 10*time.Second, "the web Service answers through both its ClusterIPs", func() error {
		for _, vip := range []netip.Addr{vip4, vip6} {
			rs := e.probeFrom(client, "--target", target(vip, 80), "--timeout", "500ms")
			if len(rs) != 1 || !rs[0].OK {
				return fmt.Errorf("%s: %+v", vip, rs)
			}
		}
		return nil
	})

	allWeb := []string{"web-a", "web-b"}
	for _, vip := range []netip.Addr{vip4, vip6} {
		t.Run("tcp from a pod reaches every backend "+vip.String(), func(t *testing.T) {
			rs := e.probeFrom(client, "--target", target(vip, 80), "--count", "60")
			if f := failures(rs); len(f) > 0 {
				t.Fatalf("%d of %d connections failed: %v", len(f), len(rs), f)
			}
			if got := slices.Sorted(maps.Keys(backends(rs))); !slices.Equal(got, allWeb) {
				t.Fatalf("backends reached %v, want %v", got, allWeb)
			}
			for _, r := range rs {
				if r.Peer != target(vip, 80) {
					t.Fatalf("getpeername() = %s, want the ClusterIP %s", r.Peer, target(vip, 80))
				}
				seen := netip.MustParseAddrPort(r.SeenAs).Addr()
				if seen != client.IPv4 && seen != client.IPv6 {
					t.Fatalf("backend saw the client as %s, want the pod's own address (no SNAT)", r.SeenAs)
				}
			}
		})
		for _, mode := range []string{"connected", "unconnected"} {
			t.Run(fmt.Sprintf("udp %s %s", mode, vip), func(t *testing.T) {
				rs := e.probeFrom(client, "--target", target(vip, 53), "--proto", "udp", "--udp-mode", mode, "--count", "40")
				if f := failures(rs); len(f) > 0 {
					t.Fatalf("%d of %d requests failed: %v", len(f), len(rs), f)
				}
				if got := slices.Sorted(maps.Keys(backends(rs))); !slices.Equal(got, allWeb) {
					t.Fatalf("backends reached %v, want %v", got, allWeb)
				}
				for _, r := range rs {
					if r.Peer != target(vip, 53) {
						t.Fatalf("the reply came from %s, want the ClusterIP %s", r.Peer, target(vip, 53))
					}
				}
			})
		}
	}

	t.Run("tcp from the node's own network namespace", func(t *testing.T) {
		rs := e.probeFrom(e.node, "--target", target(vip4, 80), "--count", "20")
		if f := failures(rs); len(f) > 0 {
			t.Fatalf("%v", f)
		}
	})

	t.Run("a port the ClusterIP does not serve is refused at once", func(t *testing.T) {
		for _, args := range [][]string{
			{"--target", target(vip4, 81)},
			{"--target", target(vip4, 80), "--proto", "udp", "--udp-mode", "unconnected"},
			{"--target", target(vip6, 53)},
		} {
			rs := e.probeFrom(client, append(args, "--timeout", "3s")...)
			if len(rs) != 1 || rs[0].OK || rs[0].Errno != "ECONNREFUSED" || rs[0].ElapsedMS > 1000 {
				t.Fatalf("%v: %+v, want ECONNREFUSED at once", args, rs)
			}
		}
	})

	t.Run("a Service without endpoints is refused at once", func(t *testing.T) {
		empty, err := api.CoreV1().Services(ns).Create(ctx, service("empty",
			v1.ServicePort{Name: "http", Port: 80, Protocol: v1.ProtocolTCP},
			v1.ServicePort{Name: "dns", Port: 53, Protocol: v1.ProtocolUDP},
		), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ev4, ev6 := vips(t, empty)
		eventually(t, 10*time.Second, "the empty Service is programmed", func() error {
			out, err := e.kprCmd("service", "list")
			if err != nil || !strings.Contains(out, target(ev4, 80)) {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
		for _, args := range [][]string{
			{"--target", target(ev4, 80)},
			{"--target", target(ev6, 80)},
			{"--target", target(ev4, 53), "--proto", "udp", "--udp-mode", "unconnected"},
			{"--target", target(ev4, 53), "--proto", "udp", "--udp-mode", "connected"},
		} {
			rs := e.probeFrom(client, append(args, "--timeout", "3s")...)
			if len(rs) != 1 || rs[0].OK || rs[0].Errno != "ECONNREFUSED" || rs[0].ElapsedMS > 1000 {
				t.Fatalf("%v: %+v, want ECONNREFUSED at once", args, rs)
			}
		}
	})

	t.Run("an unallocated address in the Service CIDR is unreachable at once", func(t *testing.T) {
		// kpr takes the Service CIDRs from the node's kubeadm.yaml (sandbox.ServiceSubnet).
		status, err := e.kprCmd("status")
		if err != nil {
			t.Fatalf("kpr status: %v\n%s", err, status)
		}
		for _, want := range []string{"10.96.0.0/16", "fd6b:7072:96::/112", "networking.serviceSubnet", "refused"} {
			if !strings.Contains(status, want) {
				t.Fatalf("kpr status does not show %q:\n%s", want, status)
			}
		}
		st, err := agent.ReadStatus(e.kpr.RunDir)
		if err != nil || st.Networking == nil || !slices.Equal(st.Networking.ServiceCIDRs, []string{"10.96.0.0/16", "fd6b:7072:96::/112"}) {
			t.Fatalf("status file networking: %+v %v", st, err)
		}

		svcs, err := api.CoreV1().Services(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		used := map[netip.Addr]bool{}
		for _, s := range svcs.Items {
			for _, ip := range s.Spec.ClusterIPs {
				if a, err := netip.ParseAddr(ip); err == nil {
					used[a] = true
				}
			}
		}
		// The highest addresses of each range that no Service has.
		free := func(last netip.Addr) netip.Addr {
			a := last
			for range 100 {
				if !used[a] {
					return a
				}
				a = a.Prev()
			}
			t.Fatalf("the 100 addresses below %s all have a Service", last)
			return netip.Addr{}
		}
		un4 := free(netip.MustParseAddr("10.96.255.254"))
		un6 := free(netip.MustParseAddr("fd6b:7072:96::fffe"))
		for _, args := range [][]string{
			{"--target", target(un4, 80)},
			{"--target", target(un6, 80)},
			{"--target", target(un4, 53), "--proto", "udp", "--udp-mode", "unconnected"},
			{"--target", target(un6, 53), "--proto", "udp", "--udp-mode", "connected"},
		} {
			rs := e.probeFrom(client, append(args, "--timeout", "3s")...)
			if len(rs) != 1 || rs[0].OK || rs[0].Errno != "EHOSTUNREACH" || rs[0].ElapsedMS >= 1000 {
				t.Fatalf("%v: %+v, want EHOSTUNREACH in under a second", args, rs)
			}
		}
	})

	t.Run("Services kpr must not serve are not programmed", func(t *testing.T) {
		headless := service("headless", v1.ServicePort{Name: "http", Port: 80})
		headless.Spec.ClusterIP = v1.ClusterIPNone
		other := service("other-proxy", v1.ServicePort{Name: "http", Port: 80})
		other.Labels = map[string]string{"service.kubernetes.io/service-proxy-name": "someone-else"}
		var ips []string
		for _, s := range []*v1.Service{headless, other} {
			created, err := api.CoreV1().Services(ns).Create(ctx, s, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			ips = append(ips, created.Spec.ClusterIPs...)
			if _, err := api.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice(s.Name, s.Name+"-v4", discovery.AddressTypeIPv4,
				[]discovery.EndpointPort{port("http", 8080, v1.ProtocolTCP)}, webPods...), metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		// A later Service proves kpr has processed the events above before we look.
		marker, err := api.CoreV1().Services(ns).Create(ctx, service("marker", v1.ServicePort{Name: "http", Port: 80}), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		mv4, _ := vips(t, marker)
		eventually(t, 10*time.Second, "the marker Service is programmed", func() error {
			out, err := e.kprCmd("service", "list")
			if err != nil || !strings.Contains(out, target(mv4, 80)) {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
		out, _ := e.kprCmd("service", "list")
		for _, ip := range ips {
			if ip != "None" && strings.Contains(out, ip) {
				t.Fatalf("%s is programmed but belongs to a Service kpr must ignore:\n%s", ip, out)
			}
		}
		if c := strings.Count(out, "8080/tcp"); c != 4 {
			t.Fatalf("want only web's 4 TCP backend lines (2 per family), got %d:\n%s", c, out)
		}
	})

	t.Run("no new connection fails while endpoints change", func(t *testing.T) {
		// A steady stream of new connections through the v6 ClusterIP while its slice flips
		// between {a}, {a,b}, {b}, {a,b}: the Service always keeps an endpoint, so every
		// connection must succeed (make-before-break updates).
		type outcome struct {
			rs  []result
			err error
		}
		done := make(chan outcome, 1)
		go func() {
			rs, err := e.probeErr(client, "--target", target(vip6, 80), "--count", "600", "--interval", "5ms", "--timeout", "2s")
			done <- outcome{rs, err}
		}()
		orig, err := api.DiscoveryV1().EndpointSlices(ns).Get(ctx, "web-v6", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		all := orig.Endpoints
		sets := [][]discovery.Endpoint{all[:1], all, all[1:], all}
		for i := range 12 {
			s, err := api.DiscoveryV1().EndpointSlices(ns).Get(ctx, "web-v6", metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			s.Endpoints = sets[i%len(sets)]
			if _, err := api.DiscoveryV1().EndpointSlices(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
			time.Sleep(150 * time.Millisecond)
		}
		o := <-done
		if o.err != nil {
			t.Fatal(o.err)
		}
		if len(o.rs) != 600 {
			t.Fatalf("%d results, want 600", len(o.rs))
		}
		if f := failures(o.rs); len(f) > 0 {
			t.Fatalf("%d of %d connections failed during updates: %v", len(f), len(o.rs), f)
		}
		if got := slices.Sorted(maps.Keys(backends(o.rs))); !slices.Equal(got, allWeb) {
			t.Fatalf("backends reached %v, want %v", got, allWeb)
		}
	})

	t.Run("session affinity keeps a client on one backend", func(t *testing.T) {
		sticky := service("sticky", v1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)})
		sticky.Spec.SessionAffinity = v1.ServiceAffinityClientIP
		created, err := api.CoreV1().Services(ns).Create(ctx, sticky, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := api.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice("sticky", "sticky-v4", discovery.AddressTypeIPv4,
			[]discovery.EndpointPort{port("http", 8080, v1.ProtocolTCP)}, webPods...), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		sv4, _ := vips(t, created)
		eventually(t, 10*time.Second, "the sticky Service answers", func() error {
			if rs := e.probeFrom(client, "--target", target(sv4, 80)); len(rs) != 1 || !rs[0].OK {
				return fmt.Errorf("%+v", rs)
			}
			return nil
		})
		rs := e.probeFrom(client, "--target", target(sv4, 80), "--count", "40")
		if b := backends(rs); len(failures(rs)) > 0 || len(b) != 1 {
			t.Fatalf("with sessionAffinity ClientIP one client reached %v (failures %v), want a single backend", b, failures(rs))
		}
	})

	t.Run("removing an endpoint stops new connections to it", func(t *testing.T) {
		s, err := api.DiscoveryV1().EndpointSlices(ns).Get(ctx, "web-v4", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.Endpoints = s.Endpoints[:1] // web-a only
		if _, err := api.DiscoveryV1().EndpointSlices(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		eventually(t, 10*time.Second, "web-b is gone from the v4 ClusterIP", func() error {
			if bs := e.serviceList(t)[target(vip4, 80)+"/tcp"]; len(bs) != 1 || !strings.Contains(bs[0], webPods[0].IPv4.String()+":8080") {
				return fmt.Errorf("%s/tcp has %v", target(vip4, 80), bs)
			}
			return nil
		})
		rs := e.probeFrom(client, "--target", target(vip4, 80), "--count", "40")
		if got := backends(rs); len(failures(rs)) > 0 || got["web-a"] != 40 {
			t.Fatalf("after removing web-b: %v failures %v", got, failures(rs))
		}
		// The v6 slice still has both.
		rs = e.probeFrom(client, "--target", target(vip6, 80), "--count", "40")
		if got := slices.Sorted(maps.Keys(backends(rs))); !slices.Equal(got, allWeb) {
			t.Fatalf("v6 backends %v, want %v", got, allWeb)
		}
	})

	t.Run("a restart keeps the programmed state and connections work throughout", func(t *testing.T) {
		before, err := e.kprCmd("service", "list")
		if err != nil {
			t.Fatal(err)
		}
		// Established flows, one TCP connection and one connected UDP socket, each sending a
		// request every 100 ms across the stop and the start.
		type outcome struct {
			name string
			rs   []result
			err  error
		}
		held := make(chan outcome, 2)
		for _, args := range [][]string{
			{"--target", target(vip4, 80)},
			{"--target", target(vip6, 53), "--proto", "udp"},
		} {
			go func() {
				rs, err := e.probeErr(client, append(args, "--reuse", "--count", "50", "--interval", "100ms")...)
				held <- outcome{strings.Join(args, " "), rs, err}
			}()
		}
		time.Sleep(500 * time.Millisecond)
		e.stopKpr()
		rs := e.probeFrom(client, "--target", target(vip6, 80), "--count", "20")
		if f := failures(rs); len(f) > 0 {
			t.Fatalf("while kpr is stopped: %v", f)
		}
		e.startKpr(ctx)
		after, err := e.kprCmd("service", "list")
		if err != nil {
			t.Fatal(err)
		}
		if before != after {
			t.Fatalf("the restart changed the datapath:\nbefore:\n%s\nafter:\n%s", before, after)
		}
		for range 2 {
			o := <-held
			if o.err != nil {
				t.Fatal(o.err)
			}
			if f := failures(o.rs); len(o.rs) != 50 || len(f) > 0 {
				t.Fatalf("established flow %s: %d results, failures %v", o.name, len(o.rs), f)
			}
			if b := backends(o.rs); len(b) != 1 {
				t.Fatalf("established flow %s moved between backends: %v", o.name, b)
			}
			for _, r := range o.rs {
				if !strings.HasPrefix(r.Peer, "10.96.") && !strings.HasPrefix(r.Peer, "[fd6b:7072:96:") {
					t.Fatalf("established flow %s: getpeername() = %s, want the ClusterIP", o.name, r.Peer)
				}
			}
		}
		rs = e.probeFrom(client, "--target", target(vip4, 53), "--proto", "udp", "--count", "20")
		if f := failures(rs); len(f) > 0 {
			t.Fatalf("after the restart: %v", f)
		}
		status, err := e.kprCmd("status")
		if err != nil || !strings.Contains(status, "running") || !strings.Contains(status, "11 programs attached") ||
			!strings.Contains(status, " of 131072 in use by sockets connected to a Service") {
			t.Fatalf("kpr status: %v\n%s", err, status)
		}
	})

	t.Run("a reload puts back a frontend deleted behind kpr's back", func(t *testing.T) {
		m, err := bpf.OpenMaps(e.kpr.PinDir)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		svcs, err := m.Services()
		if err != nil {
			t.Fatal(err)
		}
		k := bpf.ServiceKey{Addr: vip4, Port: 80, Proto: bpf.ProtoTCP, Scope: bpf.ScopeSocket}
		s, ok := svcs[k]
		if !ok {
			t.Fatalf("%s is not in the service map", k)
		}
		if err := m.DeleteService(k, len(s.Backends)); err != nil {
			t.Fatal(err)
		}
		rs := e.probeFrom(client, "--target", target(vip4, 80), "--timeout", "3s")
		if len(rs) != 1 || rs[0].OK || rs[0].Errno != "ECONNREFUSED" {
			t.Fatalf("with the frontend deleted: %+v, want ECONNREFUSED", rs)
		}
		if err := e.kpr.Proc.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		eventually(t, 10*time.Second, "the frontend is back after SIGHUP", func() error {
			rs := e.probeFrom(client, "--target", target(vip4, 80), "--count", "10")
			if f := failures(rs); len(f) > 0 {
				return fmt.Errorf("%v", f)
			}
			return nil
		})
		if log := readFile(t, e.kpr.Proc.LogPath); !strings.Contains(log, "differed from what kpr had programmed") {
			t.Fatalf("kpr did not report the drift:\n%s", e.kpr.Proc.LogTail(20))
		}
		status, err := e.kprCmd("status")
		if err != nil || !strings.Contains(status, "last full sync") {
			t.Fatalf("kpr status does not show the full sync: %v\n%s", err, status)
		}
	})

	t.Run("systemd hears READY, watchdog pings and STOPPING", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "notify.sock")
		conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		msgs := make(chan string, 100)
		go func() {
			buf := make([]byte, 4096)
			for {
				n, err := conn.Read(buf)
				if err != nil {
					close(msgs)
					return
				}
				msgs <- string(buf[:n])
			}
		}()
		next := func(what string, within time.Duration) string {
			t.Helper()
			deadline := time.After(within)
			for {
				select {
				case m := <-msgs:
					if strings.Contains(m, what) {
						return m
					}
				case <-deadline:
					t.Fatalf("no %s from kpr within %s", what, within)
				}
			}
		}
		e.stopKpr()
		e.kpr.Env = []string{"NOTIFY_SOCKET=" + sock, "WATCHDOG_USEC=400000"}
		defer func() { e.kpr.Env = nil }()
		e.startKpr(ctx)
		next("READY=1", 5*time.Second)
		for range 3 {
			next("WATCHDOG=1", 2*time.Second)
		}
		e.stopKpr()
		next("STOPPING=1", 5*time.Second)
		e.kpr.Env = nil
		e.startKpr(ctx)
	})

	t.Run("while the API server is down the datapath keeps serving", func(t *testing.T) {
		logBefore := readFile(t, e.kpr.Proc.LogPath)
		if err := e.cp.StopAPIServer(); err != nil {
			t.Fatal(err)
		}
		eventually(t, 30*time.Second, "kpr reports the API server unreachable", func() error {
			st, err := agent.ReadStatus(e.kpr.RunDir)
			if err != nil || !strings.HasPrefix(st.API, "unreachable") {
				return fmt.Errorf("status %+v %v\nkpr log:\n%s", st, err, e.kpr.Proc.LogTail(30))
			}
			return nil
		})
		rs := e.probeFrom(client, "--target", target(vip6, 80), "--count", "20")
		if got := slices.Sorted(maps.Keys(backends(rs))); len(failures(rs)) > 0 || !slices.Equal(got, allWeb) {
			t.Fatalf("with the API server down: backends %v, failures %v", got, failures(rs))
		}
		time.Sleep(3 * time.Second) // long enough for client-go to retry a few times
		if err := e.cp.StartAPIServer(ctx); err != nil {
			t.Fatal(err)
		}
		eventually(t, 30*time.Second, "kpr reconnects", func() error {
			st, err := agent.ReadStatus(e.kpr.RunDir)
			if err != nil || st.API != "connected" {
				return fmt.Errorf("status %+v %v", st, err)
			}
			return nil
		})
		// A change made after the outage reaches the datapath: web-b back in the v4 slice.
		sl, err := api.DiscoveryV1().EndpointSlices(ns).Get(ctx, "web-v4", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		sl.Endpoints = slice("web", "web-v4", discovery.AddressTypeIPv4, ports, webPods...).Endpoints
		if _, err := api.DiscoveryV1().EndpointSlices(ns).Update(ctx, sl, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		eventually(t, 30*time.Second, "web-b is back behind the v4 ClusterIP", func() error {
			rs := e.probeFrom(client, "--target", target(vip4, 80), "--count", "30")
			if got := slices.Sorted(maps.Keys(backends(rs))); !slices.Equal(got, allWeb) {
				return fmt.Errorf("backends %v", got)
			}
			return nil
		})
		log := strings.TrimPrefix(readFile(t, e.kpr.Proc.LogPath), logBefore)
		if n := strings.Count(log, "API server unreachable"); n != 1 {
			t.Fatalf("kpr logged the outage %d times, want once:\n%s", n, log)
		}
		if n := strings.Count(log, "API server reachable again"); n != 1 {
			t.Fatalf("kpr logged the recovery %d times, want once:\n%s", n, log)
		}
	})

	t.Run("deleting the Service removes its translation", func(t *testing.T) {
		if err := api.CoreV1().Services(ns).Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		// Each informer resumes its watch on its own backoff (up to 30 s in client-go) after the
		// API outage of the previous subtest.
		eventually(t, 45*time.Second, "web's ClusterIP is gone from the datapath", func() error {
			out, _ := e.kprCmd("service", "list")
			if strings.Contains(out, vip4.String()) || strings.Contains(out, vip6.String()) {
				return fmt.Errorf("still programmed:\n%s", out)
			}
			return nil
		})
		// The address is unallocated now, inside the Service CIDR: refused as unreachable.
		rs := e.probeFrom(client, "--target", target(vip4, 80), "--timeout", "3s")
		if len(rs) != 1 || rs[0].OK || rs[0].Errno != "EHOSTUNREACH" || rs[0].ElapsedMS >= 1000 {
			t.Fatalf("after deleting the Service: %+v, want EHOSTUNREACH in under a second", rs)
		}
	})

	t.Run("kpr cleanup detaches and removes everything", func(t *testing.T) {
		e.stopKpr()
		if out, err := e.kprCmd("cleanup"); err != nil {
			t.Fatalf("kpr cleanup: %v\n%s", err, out)
		}
		if _, err := os.Stat(e.kpr.PinDir); !os.IsNotExist(err) {
			t.Fatalf("pin directory %s still there (%v)", e.kpr.PinDir, err)
		}
		out, err := exec.Command("bpftool", "cgroup", "show", e.kpr.Cgroup).CombinedOutput()
		if err != nil || strings.Contains(string(out), "connect") || strings.Contains(string(out), "sendmsg") {
			t.Fatalf("programs still attached to %s: %v\n%s", e.kpr.Cgroup, err, out)
		}
		if _, err := os.Stat(filepath.Join(e.kpr.RunDir, agent.StatusFile)); !os.IsNotExist(err) {
			t.Fatalf("status file left behind (%v)", err)
		}
		status, _ := e.kprCmd("status")
		if !strings.Contains(status, "not loaded") {
			t.Fatalf("kpr status after cleanup:\n%s", status)
		}
	})
}
