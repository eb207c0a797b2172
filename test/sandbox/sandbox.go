package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Test LAN and cluster addressing, from docs/ARCHITECTURE.md.
const (
	ControlPlaneIPv4 = "198.18.0.1"
	ControlPlaneIPv6 = "fd6b:7072::1"
	APIServerPort    = 6443
	ServiceSubnet    = "10.96.0.0/16,fd6b:7072:96::/112"
	PodSubnet        = "10.244.0.0/16,fd6b:7072:244::/56"
	DNSDomain        = "cluster.local"
	// KubernetesVersion is what kubeadm.yaml claims; the binaries come from hack/k8s-version.
	KubernetesVersion = "v1.36.3"
)

// Bounds on waiting for the control plane.
const (
	etcdReadyTimeout      = 30 * time.Second
	apiserverReadyTimeout = 90 * time.Second
)

// apiserverFeatureGates: etcd 3.4.23 predates the RequestWatchProgress fixes the apiserver
// requires (3.4.31), so watch-list streams would fail; plain list+watch works.
const apiserverFeatureGates = "WatchList=false"

// ErrNoKubeAPIServer is returned (wrapped) by Start when the kube-apiserver binary is missing.
var ErrNoKubeAPIServer = errors.New("kube-apiserver binary not found (run hack/k8s.sh bins or set KPR_K8S_BINDIR)")

// Options configure Start.
type Options struct {
	// Prefix starts every namespace name; "kpr-e2e-<6 hex>" when empty.
	Prefix string
	// K8sBinDir holds kube-apiserver; default $KPR_K8S_BINDIR, else `hack/k8s.sh bindir`.
	K8sBinDir string
	// EtcdPath is the etcd binary; default "etcd" from PATH.
	EtcdPath string
	// WorkDir receives PKI, etcd data, kubeconfigs, node dirs and logs. Required.
	WorkDir string
	// APIServerArgs are appended to kube-apiserver's flags (a later flag wins), e.g. feature gates.
	APIServerArgs []string
	// Log receives progress messages (e.g. t.Logf); optional.
	Log func(format string, args ...any)
	// NoProxyRBAC leaves out the ClusterRoleBinding of system:node-proxier to the group
	// system:nodes, which the sandbox otherwise creates so each node's kpr can read Services
	// and EndpointSlices with the node's credentials (what `kpr kubeadm setup` creates).
	NoProxyRBAC bool
}

// ControlPlane is the sandbox cluster: etcd and kube-apiserver in their own network namespace,
// plus the nodes and pods added to it.
type ControlPlane struct {
	Prefix          string
	NS              string // control-plane network namespace
	APIServer       string // https://198.18.0.1:6443
	AdminKubeconfig string // admin.conf (system:masters), server https://198.18.0.1:6443
	CAFile          string // cluster CA certificate
	WorkDir         string
	// RESTConfig and Client are the admin identity; their connections are opened inside NS
	// (see the package documentation), so they work from the root namespace.
	RESTConfig *rest.Config
	Client     kubernetes.Interface

	opts    Options
	log     func(format string, args ...any)
	pki     *pki
	cleanup cleanupStack
	procs   *procRunner

	topo    sync.Mutex // serializes topology changes (nodes, pods, routes)
	nodes   map[string]*Node
	indexes map[int]*Node
	hosts   []*Host // external hosts (host.go)

	mu      sync.Mutex
	netnses []string // every namespace created, for the leak check in Close
	inodes  map[uint64]string
	// nsHolds keeps every namespace alive (an open fd) until Close has looked for leftover
	// processes: once a namespace is freed its inode number can be reused by a namespace of
	// another sandbox running at the same time, which would be reported as ours.
	nsHolds  []*os.File
	closed   bool
	closeErr error

	apiserverBin  string
	apiserverProc *Process
}

var prefixRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,31}$`)

// Start creates the control-plane namespace and bridge, generates the PKI, starts etcd and
// kube-apiserver in it, waits for /readyz and installs the RBAC a kubeadm node gets for
// kube-proxy. On failure everything created so far is removed before Start returns.
func Start(ctx context.Context, o Options) (*ControlPlane, error) {
	if o.WorkDir == "" {
		return nil, errors.New("sandbox: Options.WorkDir is required")
	}
	if o.Prefix == "" {
		b := make([]byte, 3)
		if _, err := rand.Read(b); err != nil {
			return nil, err
		}
		o.Prefix = "kpr-e2e-" + hex.EncodeToString(b)
	}
	if !prefixRE.MatchString(o.Prefix) {
		return nil, fmt.Errorf("sandbox: prefix %q: want lower-case letters, digits and '-', at most 32", o.Prefix)
	}
	workDir, err := filepath.Abs(o.WorkDir)
	if err != nil {
		return nil, err
	}
	o.WorkDir = workDir
	apiserverBin, err := findKubeAPIServer(o.K8sBinDir)
	if err != nil {
		return nil, err
	}
	etcdBin := o.EtcdPath
	if etcdBin == "" {
		etcdBin = "etcd"
	}
	if etcdBin, err = exec.LookPath(etcdBin); err != nil {
		return nil, fmt.Errorf("sandbox: etcd: %w", err)
	}
	logf := o.Log
	if logf == nil {
		logf = func(string, ...any) {}
	}

	cp := &ControlPlane{
		Prefix:          o.Prefix,
		NS:              o.Prefix + "-cp",
		APIServer:       fmt.Sprintf("https://%s", net.JoinHostPort(ControlPlaneIPv4, fmt.Sprint(APIServerPort))),
		AdminKubeconfig: filepath.Join(workDir, "admin.conf"),
		WorkDir:         workDir,
		opts:            o,
		log:             logf,
		nodes:           map[string]*Node{},
		indexes:         map[int]*Node{},
		inodes:          map[uint64]string{},
	}
	cp.procs = &procRunner{logDir: filepath.Join(workDir, "logs"), cs: &cp.cleanup, spawner: newSpawner()}
	if err := cp.start(ctx, apiserverBin, etcdBin); err != nil {
		if cerr := cp.Close(); cerr != nil {
			err = fmt.Errorf("%w (cleanup: %v)", err, cerr)
		}
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	return cp, nil
}

func (cp *ControlPlane) start(ctx context.Context, apiserverBin, etcdBin string) error {
	for _, d := range []string{"logs", "nodes"} {
		if err := os.MkdirAll(filepath.Join(cp.WorkDir, d), 0o755); err != nil {
			return err
		}
	}
	var err error
	if cp.pki, err = newPKI(filepath.Join(cp.WorkDir, "pki")); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	cp.CAFile = cp.pki.path("ca.crt")
	if err := cp.pki.writeKubeconfig(cp.AdminKubeconfig, cp.APIServer, "kubernetes-admin", cp.pki.adminPEM); err != nil {
		return err
	}

	cp.log("sandbox: control-plane namespace %s", cp.NS)
	if err := cp.newNamespace(ctx, &cp.cleanup, cp.NS,
		"net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0", "net.ipv6.conf.default.forwarding=0"); err != nil {
		return err
	}
	if v, err := readSysctl(ctx, cp.NS, "net.ipv4.ip_forward"); err != nil || v != "0" {
		return fmt.Errorf("control-plane namespace must not forward: ip_forward=%q (%v)", v, err)
	}
	if err := ipBatch(ctx, cp.NS,
		[]string{"link", "add", "br0", "type", "bridge"},
		[]string{"addr", "add", ControlPlaneIPv4 + "/24", "dev", "br0"},
		[]string{"-6", "addr", "add", ControlPlaneIPv6 + "/64", "dev", "br0", "nodad"},
		[]string{"link", "set", "br0", "up"},
	); err != nil {
		return err
	}

	if err := cp.startEtcd(ctx, etcdBin); err != nil {
		return err
	}
	if err := cp.startAPIServer(ctx, apiserverBin); err != nil {
		return err
	}
	return cp.bootstrapObjects(ctx)
}

func (cp *ControlPlane) newNamespace(ctx context.Context, cs *cleanupStack, name string, sysctls ...string) error {
	if err := newNamespace(ctx, cs, name, sysctls...); err != nil {
		return err
	}
	ino, err := netnsInode(name)
	if err != nil {
		return err
	}
	hold, err := os.Open(netnsPath(name))
	if err != nil {
		return err
	}
	cp.mu.Lock()
	cp.netnses = append(cp.netnses, name)
	cp.inodes[ino] = name
	cp.nsHolds = append(cp.nsHolds, hold)
	cp.mu.Unlock()
	return nil
}

func (cp *ControlPlane) startEtcd(ctx context.Context, etcdBin string) error {
	dataDir := filepath.Join(cp.WorkDir, "etcd-data")
	p, err := cp.procs.start(context.Background(), cp.NS, Cmd{Name: etcdBin, Args: []string{
		"--name=sandbox",
		"--data-dir=" + dataDir,
		"--listen-client-urls=http://127.0.0.1:2379",
		"--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380",
		"--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=sandbox=http://127.0.0.1:2380",
		"--listen-metrics-urls=",
		"--logger=zap",
		"--log-outputs=stderr",
	}}, filepath.Join(cp.WorkDir, "etcd.log"))
	if err != nil {
		return err
	}
	cp.log("sandbox: etcd pid %d, log %s", p.Pid(), p.LogPath)
	hc := &http.Client{Transport: &http.Transport{DialContext: cp.DialContext}, Timeout: 2 * time.Second}
	defer hc.CloseIdleConnections()
	return waitFor(ctx, etcdReadyTimeout, p, "etcd /health", func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:2379/health", nil)
		if err != nil {
			return err
		}
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %s", resp.Status)
		}
		return nil
	})
}

func (cp *ControlPlane) startAPIServer(ctx context.Context, bin string) error {
	pk := cp.pki
	args := []string{
		"--etcd-servers=http://127.0.0.1:2379",
		// All addresses of the control-plane namespace (both families); the kubernetes
		// Service's endpoint is the advertised address.
		"--bind-address=::",
		"--advertise-address=" + ControlPlaneIPv4,
		fmt.Sprintf("--secure-port=%d", APIServerPort),
		"--service-cluster-ip-range=" + ServiceSubnet,
		"--authorization-mode=Node,RBAC",
		"--allow-privileged=true", // as kubeadm runs it: kube-proxy's DaemonSet is privileged
		// No controller-manager creates service-account tokens.
		"--disable-admission-plugins=ServiceAccount",
		"--client-ca-file=" + pk.path("ca.crt"),
		"--tls-cert-file=" + pk.path("apiserver.crt"),
		"--tls-private-key-file=" + pk.path("apiserver.key"),
		"--service-account-issuer=https://kubernetes.default.svc." + DNSDomain,
		"--service-account-key-file=" + pk.path("sa.pub"),
		"--service-account-signing-key-file=" + pk.path("sa.key"),
		"--cert-dir=" + filepath.Join(cp.WorkDir, "apiserver-certs"),
		"--feature-gates=" + apiserverFeatureGates,
		"--profiling=false",
		"--v=1",
	}
	args = append(args, cp.opts.APIServerArgs...)
	p, err := cp.procs.start(context.Background(), cp.NS, Cmd{Name: bin, Args: args}, filepath.Join(cp.WorkDir, "kube-apiserver.log"))
	if err != nil {
		return err
	}
	cp.apiserverBin, cp.apiserverProc = bin, p
	cp.log("sandbox: kube-apiserver pid %d, log %s", p.Pid(), p.LogPath)

	cfg, err := clientcmd.BuildConfigFromFlags("", cp.AdminKubeconfig)
	if err != nil {
		return err
	}
	cfg.Dial = cp.DialContext
	cfg.QPS, cfg.Burst = 100, 200
	cfg.Timeout = 30 * time.Second
	cp.RESTConfig = cfg
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	cp.Client = client
	return waitFor(ctx, apiserverReadyTimeout, p, "kube-apiserver /readyz", func(ctx context.Context) error {
		body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").Do(ctx).Raw()
		if err != nil {
			return fmt.Errorf("%w %s", err, body)
		}
		return nil
	})
}

// bootstrapObjects creates what kubeadm would have: kube-proxy's permissions for the node
// identities (kube-proxy on a kubeadm node runs with its own service account; here nodes'
// kubelet.conf credentials stand in for it) and the kubeadm-config ConfigMap.
func (cp *ControlPlane) bootstrapObjects(ctx context.Context) error {
	crb := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "kpr-sandbox:node-proxier"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "system:node-proxier"},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.GroupKind, Name: "system:nodes"}},
	}
	if !cp.opts.NoProxyRBAC {
		if _, err := cp.Client.RbacV1().ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("ClusterRoleBinding %s: %w", crb.Name, err)
		}
	}
	cm := &v1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "kubeadm-config", Namespace: metav1.NamespaceSystem},
		Data:       map[string]string{"ClusterConfiguration": clusterConfiguration},
	}
	if _, err := cp.Client.CoreV1().ConfigMaps(cm.Namespace).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("ConfigMap kube-system/kubeadm-config: %w", err)
	}
	role := &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "kubeadm:nodes-kubeadm-config", Namespace: metav1.NamespaceSystem},
		Rules: []rbacv1.PolicyRule{{
			APIGroups: []string{""}, Resources: []string{"configmaps"},
			ResourceNames: []string{"kubeadm-config"}, Verbs: []string{"get"},
		}},
	}
	if _, err := cp.Client.RbacV1().Roles(role.Namespace).Create(ctx, role, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("Role %s: %w", role.Name, err)
	}
	rb := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: role.Name, Namespace: role.Namespace},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: role.Name},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.GroupKind, Name: "system:nodes"}},
	}
	if _, err := cp.Client.RbacV1().RoleBindings(rb.Namespace).Create(ctx, rb, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("RoleBinding %s: %w", rb.Name, err)
	}
	return nil
}

// StopAPIServer stops kube-apiserver (etcd keeps running), so a test can see how clients
// behave while the API is unreachable.
func (cp *ControlPlane) StopAPIServer() error {
	if cp.apiserverProc == nil {
		return errors.New("sandbox: kube-apiserver is not running")
	}
	p := cp.apiserverProc
	cp.apiserverProc = nil
	return p.Stop()
}

// StartAPIServer starts kube-apiserver again after StopAPIServer and waits for /readyz.
func (cp *ControlPlane) StartAPIServer(ctx context.Context) error {
	if cp.apiserverProc != nil {
		return errors.New("sandbox: kube-apiserver is already running")
	}
	return cp.startAPIServer(ctx, cp.apiserverBin)
}

func (cp *ControlPlane) isClosed() bool {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return cp.closed
}

// ensureNamespace creates a Kubernetes namespace unless it exists.
func (cp *ControlPlane) ensureNamespace(ctx context.Context, name string) error {
	_, err := cp.Client.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("namespace %s: %w", name, err)
	}
	return nil
}

// DialContext opens a connection from inside the control-plane namespace.
func (cp *ControlPlane) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return dialInNetns(ctx, netnsPath(cp.NS), network, address)
}

// Start runs a long-lived command in the control-plane namespace (see Node.Start).
func (cp *ControlPlane) Start(ctx context.Context, name string, args ...string) (*Process, error) {
	return cp.procs.start(ctx, cp.NS, Cmd{Name: name, Args: args}, "")
}

// Exec runs a short command in the control-plane namespace (see Node.Exec).
func (cp *ControlPlane) Exec(ctx context.Context, cgroupFD int, name string, args ...string) ([]byte, error) {
	return cp.procs.exec(ctx, cp.NS, Cmd{Name: name, Args: args, CgroupFD: cgroupFD})
}

// Namespaces lists every network namespace the sandbox created, control plane first.
func (cp *ControlPlane) Namespaces() []string {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return append([]string(nil), cp.netnses...)
}

// Processes lists every process the sandbox started (running or not).
func (cp *ControlPlane) Processes() []*Process { return cp.procs.processes() }

// Close stops every process the sandbox started (SIGTERM, then SIGKILL), deletes every network
// namespace it created and reports any process still found in one of them. Files in WorkDir are
// left for inspection. It is safe on a nil or partly started ControlPlane and idempotent.
func (cp *ControlPlane) Close() error {
	if cp == nil {
		return nil
	}
	cp.mu.Lock()
	if cp.closed {
		cp.mu.Unlock()
		return cp.closeErr
	}
	cp.closed = true
	cp.mu.Unlock()
	// Let a concurrent AddNode or AddPod finish (or fail) and hand over its cleanup first.
	cp.topo.Lock()
	defer cp.topo.Unlock()

	errs := []error{cp.cleanup.unwind()}
	if cp.procs != nil {
		cp.procs.spawner.close()
		// A process whose start raced with the first unwind registered its Stop afterwards.
		errs = append(errs, cp.cleanup.unwind())
	}
	cp.mu.Lock()
	inodes := cp.inodes
	holds := cp.nsHolds
	cp.nsHolds = nil
	cp.mu.Unlock()
	defer func() {
		for _, f := range holds {
			f.Close()
		}
	}()
	if left := processesInNetns(inodes); len(left) > 0 {
		var pids []string
		for pid, ns := range left {
			pids = append(pids, fmt.Sprintf("%d (%s)", pid, ns))
		}
		sort.Strings(pids)
		errs = append(errs, fmt.Errorf("processes still in sandbox namespaces: %s", strings.Join(pids, ", ")))
	}
	for _, ns := range cp.Namespaces() {
		if _, err := os.Stat(netnsPath(ns)); err == nil {
			errs = append(errs, fmt.Errorf("network namespace %s still exists", ns))
		}
	}
	err := errors.Join(errs...)
	if err != nil {
		err = fmt.Errorf("sandbox close: %w", err)
	}
	cp.mu.Lock()
	cp.closeErr = err
	cp.mu.Unlock()
	return err
}

// waitFor polls check every 250ms until it succeeds, the timeout passes, ctx ends or p exits.
func waitFor(ctx context.Context, timeout time.Duration, p *Process, what string, check func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
		last = check(cctx)
		ccancel()
		if last == nil {
			return nil
		}
		select {
		case <-p.Done():
			return fmt.Errorf("waiting for %s: %s exited (%v); log %s:\n%s", what, p.Name, p.Wait(), p.LogPath, p.LogTail(3000))
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w (last error: %v); log %s:\n%s", what, ctx.Err(), last, p.LogPath, p.LogTail(3000))
		case <-tick.C:
		}
	}
}

// findKubeAPIServer resolves the kube-apiserver binary: explicit dir, $KPR_K8S_BINDIR, then
// `hack/k8s.sh bindir` of this module.
func findKubeAPIServer(dir string) (string, error) {
	if dir == "" {
		dir = os.Getenv("KPR_K8S_BINDIR")
	}
	if dir == "" {
		root, err := moduleRoot()
		if err != nil {
			return "", fmt.Errorf("%w: %v", ErrNoKubeAPIServer, err)
		}
		out, err := run(context.Background(), filepath.Join(root, "hack", "k8s.sh"), "bindir")
		if err != nil {
			return "", fmt.Errorf("%w: %v", ErrNoKubeAPIServer, err)
		}
		dir = strings.TrimSpace(string(out))
	}
	bin := filepath.Join(dir, "kube-apiserver")
	st, err := os.Stat(bin)
	if err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		return "", fmt.Errorf("%w: %s", ErrNoKubeAPIServer, bin)
	}
	return bin, nil
}

// K8sBinDir returns the directory Start would take kube-apiserver from, and whether the binary
// is there; tests use it to decide whether to skip.
func K8sBinDir() (string, bool) {
	bin, err := findKubeAPIServer("")
	if err != nil {
		return "", false
	}
	return filepath.Dir(bin), true
}

// moduleRoot finds the kpr module: the directory of this source file's module, else the current
// directory's.
func moduleRoot() (string, error) {
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		dir := filepath.Join(filepath.Dir(file), "..", "..")
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return filepath.Clean(dir), nil
		}
	}
	out, err := run(context.Background(), "go", "env", "GOMOD")
	if err != nil {
		return "", err
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside the kpr module")
	}
	return filepath.Dir(gomod), nil
}
