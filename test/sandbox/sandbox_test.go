package sandbox

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	v1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

func TestAddressing(t *testing.T) {
	for _, tc := range []struct {
		index, slot  int
		node4, node6 string
		cidr4, cidr6 string
		pod4, pod6   string
	}{
		{1, 1, "198.18.0.11", "fd6b:7072::11", "10.244.1.0/24", "fd6b:7072:244:1::/64", "10.244.1.1", "fd6b:7072:244:1::1"},
		{12, 200, "198.18.0.22", "fd6b:7072::22", "10.244.12.0/24", "fd6b:7072:244:12::/64", "10.244.12.200", "fd6b:7072:244:12::200"},
	} {
		n4, n6 := NodeIPs(tc.index)
		c4, c6 := NodePodCIDRs(tc.index)
		p4, p6 := PodIPs(tc.index, tc.slot)
		got := []string{n4.String(), n6.String(), c4.String(), c6.String(), p4.String(), p6.String()}
		want := []string{tc.node4, tc.node6, tc.cidr4, tc.cidr6, tc.pod4, tc.pod6}
		for i := range got {
			if got[i] != want[i] {
				t.Errorf("index %d slot %d: got %s, want %s", tc.index, tc.slot, got[i], want[i])
			}
		}
		if !netip.MustParsePrefix("10.244.0.0/16").Contains(p4) || !netip.MustParsePrefix("fd6b:7072:244::/56").Contains(p6) {
			t.Errorf("pod IPs %s %s outside the pod subnet", p4, p6)
		}
	}
}

// requireSandbox skips unless the test can build a sandbox; with KPR_E2E set, a missing
// kube-apiserver is a failure instead.
func requireSandbox(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces)")
	}
	if _, ok := K8sBinDir(); !ok {
		if os.Getenv("KPR_E2E") != "" {
			t.Fatalf("KPR_E2E is set but %v", ErrNoKubeAPIServer)
		}
		t.Skipf("%v; set KPR_E2E=1 to make this a failure", ErrNoKubeAPIServer)
	}
}

func TestSandbox(t *testing.T) {
	requireSandbox(t)
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()

	probe, err := BuildProbe(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	cp, err := Start(ctx, Options{WorkDir: t.TempDir(), Log: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			if err := cp.Close(); err != nil {
				t.Error(err)
			}
		}
	})
	t.Logf("control plane ready in %v", time.Since(start).Round(time.Millisecond))

	if v, err := readSysctl(ctx, cp.NS, "net.ipv4.ip_forward"); err != nil || v != "0" {
		t.Errorf("control plane ip_forward = %q (%v), want 0", v, err)
	}

	node1, err := cp.AddNode(ctx, "node1", 1)
	if err != nil {
		t.Fatal(err)
	}
	node2, err := cp.AddNode(ctx, "node2", 2)
	if err != nil {
		t.Fatal(err)
	}
	podA, err := node1.AddPod(ctx, "e2e", "pod-a", 1)
	if err != nil {
		t.Fatal(err)
	}
	podB, err := node1.AddPod(ctx, "e2e", "pod-b", 2)
	if err != nil {
		t.Fatal(err)
	}
	podC, err := node2.AddPod(ctx, "e2e", "pod-c", 1)
	if err != nil {
		t.Fatal(err)
	}
	pods := []*Pod{podA, podB, podC}
	for _, p := range pods {
		if _, err := p.Start(ctx, probe, "serve", "--name", p.Name, "--tcp", "8080", "--udp", "8080"); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range pods {
		for _, ip := range []netip.Addr{p.IPv4, p.IPv6} {
			if out, err := node1.Exec(ctx, 0, probe, "ready", "--target", target(ip, 8080), "--timeout", "10s"); err != nil {
				t.Fatalf("%s: %v %s", p.Name, err, out)
			}
		}
	}

	t.Run("node to pods", func(t *testing.T) {
		for _, p := range []*Pod{podA, podB} {
			for _, ip := range []netip.Addr{p.IPv4, p.IPv6} {
				seenAs := node1.IPv4
				if ip.Is6() {
					seenAs = node1.IPv6
				}
				for _, mode := range []struct{ proto, udpMode string }{{"tcp", "connected"}, {"udp", "connected"}, {"udp", "unconnected"}} {
					results := runClient(t, ctx, node1.Exec, probe, target(ip, 8080), mode.proto, mode.udpMode, 3)
					for _, r := range results {
						if !r.OK || r.Backend != p.Name || r.Peer != target(ip, 8080) || addrOf(r.SeenAs) != seenAs {
							t.Errorf("%s %s %s: %+v; want backend %s seen as %s", mode.proto, mode.udpMode, target(ip, 8080), r, p.Name, seenAs)
						}
					}
				}
			}
		}
	})

	t.Run("pod to pod across nodes", func(t *testing.T) {
		for _, pair := range [][2]netip.Addr{{podA.IPv4, podC.IPv4}, {podA.IPv6, podC.IPv6}} {
			for _, r := range runClient(t, ctx, podA.Exec, probe, target(pair[1], 8080), "tcp", "", 2) {
				if !r.OK || r.Backend != podC.Name || addrOf(r.SeenAs) != pair[0] {
					t.Errorf("pod-a -> %s: %+v; want pod-c seeing %s", pair[1], r, pair[0])
				}
			}
		}
	})

	t.Run("probe errors", func(t *testing.T) {
		closed := target(podA.IPv4, 9999)
		for _, c := range []struct{ proto, mode, errno string }{
			{"tcp", "", "ECONNREFUSED"},
			{"udp", "connected", "ECONNREFUSED"},
			{"udp", "unconnected", "ETIMEDOUT"}, // no ICMP errors on an unconnected socket
		} {
			r := runClient(t, ctx, node1.Exec, probe, closed, c.proto, c.mode, 1, "--timeout", "500ms")[0]
			if r.OK || r.Errno != c.errno {
				t.Errorf("%s %s to a closed port: %+v, want %s", c.proto, c.mode, r, c.errno)
			}
		}
	})

	t.Run("curl", func(t *testing.T) {
		if _, err := exec.LookPath("curl"); err != nil {
			t.Skip("no curl")
		}
		out, err := node1.Exec(ctx, 0, "curl", "-sS", "--max-time", "5", "http://"+target(podB.IPv6, 8080)+"/")
		name, seen, _ := strings.Cut(strings.TrimSpace(string(out)), " ")
		if err != nil || name != "pod-b" || addrOf(seen) != node1.IPv6 {
			t.Errorf("curl: %q %v", out, err)
		}
	})

	t.Run("untranslated service traffic dies in the control plane", func(t *testing.T) {
		for _, vip := range []string{"10.96.0.1:443", "[fd6b:7072:96::1]:443"} {
			results := runClient(t, ctx, podA.Exec, probe, vip, "tcp", "", 1, "--timeout", "1s")
			if r := results[0]; r.OK || !r.Timeout {
				t.Errorf("%s without a service proxy: %+v; want a timeout", vip, r)
			}
		}
	})

	var cgroupPath string
	t.Run("cgroup", func(t *testing.T) {
		cg, err := cp.NewCgroup("node1")
		if err != nil {
			t.Skip(err)
		}
		out, err := node1.Exec(ctx, cg.FD, "cat", "/proc/self/cgroup")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(out)+"\n", "/"+filepath.Base(cg.Path)+"\n") {
			t.Errorf("process not started in %s: %s", cg.Path, out)
		}
		cgroupPath = cg.Path
		p, err := node1.StartCmd(ctx, Cmd{Name: "sleep", Args: []string{"600"}, CgroupFD: cg.FD})
		if err != nil {
			t.Fatal(err)
		}
		procs, err := os.ReadFile(filepath.Join(cg.Path, "cgroup.procs"))
		if err != nil || strings.TrimSpace(string(procs)) != strconv.Itoa(p.Pid()) {
			t.Errorf("cgroup.procs %q (%v), want %d", procs, err, p.Pid())
		}
	})

	t.Run("kubeadm files", func(t *testing.T) {
		dir, _ := K8sBinDir()
		kubeadm := filepath.Join(dir, "kubeadm")
		if _, err := os.Stat(kubeadm); err != nil {
			t.Skip("no kubeadm binary")
		}
		if out, err := exec.CommandContext(ctx, kubeadm, "config", "validate", "--config", node1.KubeadmConfig()).CombinedOutput(); err != nil {
			t.Errorf("kubeadm config validate: %v\n%s", err, out)
		}
	})

	t.Run("API objects", func(t *testing.T) {
		n, err := cp.Client.CoreV1().Nodes().Get(ctx, "node1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(n.Spec.PodCIDRs, ","); got != "10.244.1.0/24,fd6b:7072:244:1::/64" {
			t.Errorf("node1 podCIDRs %s", got)
		}
		if len(n.Status.Addresses) == 0 || n.Status.Addresses[0] != (v1.NodeAddress{Type: v1.NodeInternalIP, Address: "198.18.0.11"}) {
			t.Errorf("node1 addresses %v", n.Status.Addresses)
		}
		for _, p := range pods {
			got, err := cp.Client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got.Spec.NodeName != p.Node.Name || got.Status.Phase != v1.PodRunning ||
				len(got.Status.PodIPs) != 2 || got.Status.PodIPs[0].IP != p.IPv4.String() || got.Status.PodIPs[1].IP != p.IPv6.String() {
				t.Errorf("pod %s: node %s phase %s IPs %v", p.Name, got.Spec.NodeName, got.Status.Phase, got.Status.PodIPs)
			}
		}
		svc, err := cp.Client.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
		if err != nil || svc.Spec.ClusterIP != "10.96.0.1" {
			t.Errorf("kubernetes Service: %v %v", svc.Spec.ClusterIP, err)
		}
		// No kubelet confirms deletions; a zero termination grace period makes them immediate.
		if err := cp.Client.CoreV1().Pods("e2e").Delete(ctx, "pod-b", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := cp.Client.CoreV1().Pods("e2e").Get(ctx, "pod-b", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Errorf("pod-b after delete: %v, want NotFound", err)
		}
	})

	t.Run("node credentials from inside the node", func(t *testing.T) {
		cfg, err := node1.RESTConfig()
		if err != nil {
			t.Fatal(err)
		}
		nc, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		svcs, err := nc.CoreV1().Services("").List(ctx, metav1.ListOptions{})
		if err != nil || len(svcs.Items) == 0 {
			t.Errorf("list services as system:node:node1: %d items, %v", len(svcs.Items), err)
		}
		if _, err := nc.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{}); err != nil {
			t.Errorf("list endpointslices as system:node:node1: %v", err)
		}
		if _, err := nc.CoreV1().ConfigMaps("kube-system").Get(ctx, "kubeadm-config", metav1.GetOptions{}); err != nil {
			t.Errorf("get kubeadm-config as system:node:node1: %v", err)
		}
		// The API server answers on the control plane's IPv6 address too (kubeadm endpoints
		// may be either family).
		cfg6 := *cfg
		cfg6.Host = "https://[" + ControlPlaneIPv6 + "]:6443"
		nc6, err := kubernetes.NewForConfig(&cfg6)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := nc6.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{}); err != nil {
			t.Errorf("get kubernetes Service over IPv6: %v", err)
		}
		for _, ra := range []authorizationv1.ResourceAttributes{
			{Verb: "list", Resource: "services"},
			{Verb: "watch", Resource: "services"},
			{Verb: "list", Group: "discovery.k8s.io", Resource: "endpointslices"},
			{Verb: "watch", Group: "discovery.k8s.io", Resource: "endpointslices"},
		} {
			sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
				User: "system:node:node1", Groups: []string{"system:nodes", "system:authenticated"}, ResourceAttributes: &ra,
			}}
			got, err := cp.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
			if err != nil || !got.Status.Allowed {
				t.Errorf("SubjectAccessReview %s %s: %+v %v", ra.Verb, ra.Resource, got.Status, err)
			}
		}
	})

	// client-go informers (kpr's agent uses them) must sync against etcd 3.4.
	t.Run("informers sync", func(t *testing.T) {
		sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
		defer scancel()
		f := informers.NewSharedInformerFactory(cp.Client, 0)
		svcInf := f.Core().V1().Services().Informer()
		epsInf := f.Discovery().V1().EndpointSlices().Informer()
		stop := make(chan struct{})
		f.Start(stop)
		defer f.Shutdown()
		defer close(stop)
		began := time.Now()
		if !cache.WaitForCacheSync(sctx.Done(), svcInf.HasSynced, epsInf.HasSynced) {
			t.Fatal("informers did not sync in 30s")
		}
		t.Logf("informers synced in %v", time.Since(began).Round(time.Millisecond))
		eps := &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: "informer-check", Namespace: "e2e"},
			AddressType: discoveryv1.AddressTypeIPv4,
		}
		if _, err := cp.Client.DiscoveryV1().EndpointSlices("e2e").Create(sctx, eps, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		for !hasKey(epsInf, "e2e/informer-check") {
			select {
			case <-sctx.Done():
				t.Fatal("watch did not deliver the new EndpointSlice")
			case <-time.After(50 * time.Millisecond):
			}
		}
	})

	nsNames := cp.Namespaces()
	procs := cp.Processes()
	closed = true
	if err := cp.Close(); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), cp.Prefix) {
		t.Errorf("namespaces left after Close:\n%s", out)
	}
	if cgroupPath != "" {
		if _, err := os.Stat(cgroupPath); err == nil {
			t.Errorf("cgroup %s left after Close", cgroupPath)
		}
	}
	if len(nsNames) != 6 {
		t.Errorf("namespaces %v, want cp + 2 nodes + 3 pods", nsNames)
	}
	for _, p := range procs {
		if err := syscall.Kill(p.Pid(), 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("%s pid %d still exists after Close (kill 0: %v)", p.Name, p.Pid(), err)
		}
	}
	if len(procs) != 6 {
		t.Errorf("%d processes recorded, want etcd, kube-apiserver, 3 probes and sleep", len(procs))
	}
}

// TestStartFailureCleansUp makes kube-apiserver fail at once and checks that Start removes what
// it had made (namespace, etcd).
func TestStartFailureCleansUp(t *testing.T) {
	requireSandbox(t)
	bin := t.TempDir()
	fake := "#!/bin/sh\necho fake kube-apiserver failing >&2\nexit 3\n"
	if err := os.WriteFile(filepath.Join(bin, "kube-apiserver"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	prefix := "kpr-e2e-fail" + strconv.Itoa(os.Getpid()%10000)
	cp, err := Start(t.Context(), Options{Prefix: prefix, K8sBinDir: bin, WorkDir: work, Log: t.Logf})
	if err == nil {
		cp.Close()
		t.Fatal("Start succeeded with a failing kube-apiserver")
	}
	if !strings.Contains(err.Error(), "fake kube-apiserver failing") {
		t.Errorf("error does not carry the apiserver log: %v", err)
	}
	if _, serr := os.Stat(netnsPath(prefix + "-cp")); serr == nil {
		t.Errorf("namespace %s-cp left behind", prefix)
	}
	if left := etcdLeft(work); left != "" {
		t.Errorf("etcd still running: %s", left)
	}
}

// etcdLeft finds an etcd process whose data dir is in work.
func etcdLeft(work string) string {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if bytes.Contains(cmdline, []byte(work)) {
			return e.Name() + " " + string(bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '}))
		}
	}
	return ""
}

type probeResult struct {
	OK      bool   `json:"ok"`
	Backend string `json:"backend"`
	Errno   string `json:"errno"`
	Err     string `json:"err"`
	Timeout bool   `json:"timeout"`
	Peer    string `json:"peer"`
	SeenAs  string `json:"seen_as"`
}

type execFunc func(ctx context.Context, cgroupFD int, name string, args ...string) ([]byte, error)

func runClient(t *testing.T, ctx context.Context, exec execFunc, probe, target, proto, udpMode string, count int, extra ...string) []probeResult {
	t.Helper()
	args := []string{"client", "--target", target, "--proto", proto, "--count", strconv.Itoa(count)}
	if udpMode != "" {
		args = append(args, "--udp-mode", udpMode)
	}
	out, err := exec(ctx, 0, probe, append(args, extra...)...)
	if err != nil {
		t.Fatalf("probe client: %v", err)
	}
	var results []probeResult
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		var r probeResult
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("probe client output %q: %v", sc.Text(), err)
		}
		results = append(results, r)
	}
	if len(results) != count {
		t.Fatalf("probe client printed %d results, want %d:\n%s", len(results), count, out)
	}
	return results
}

func target(ip netip.Addr, port uint16) string { return netip.AddrPortFrom(ip, port).String() }

func addrOf(hostPort string) netip.Addr {
	host, _, err := net.SplitHostPort(hostPort)
	if err != nil {
		return netip.Addr{}
	}
	a, _ := netip.ParseAddr(host)
	return a
}

func hasKey(inf cache.SharedIndexInformer, key string) bool {
	_, ok, _ := inf.GetStore().GetByKey(key)
	return ok
}
