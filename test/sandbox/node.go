package sandbox

import (
	"context"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"github.com/cilium/ebpf/link"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// clusterConfiguration is the kubeadm v1beta4 ClusterConfiguration of the sandbox cluster, as a
// node's kubeadm.yaml and as kube-system/kubeadm-config would hold it.
var clusterConfiguration = fmt.Sprintf(`apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
clusterName: kubernetes
kubernetesVersion: %s
controlPlaneEndpoint: %s:%d
certificatesDir: /etc/kubernetes/pki
networking:
  dnsDomain: %s
  serviceSubnet: %s
  podSubnet: %s
`, KubernetesVersion, ControlPlaneIPv4, APIServerPort, DNSDomain, ServiceSubnet, PodSubnet)

// Node is a network namespace standing in for a kubeadm node.
type Node struct {
	Name    string
	NS      string // network namespace
	NodeDir string // stands in for the node's "/": NodeDir/etc/kubernetes/{kubelet.conf,kubeadm.yaml,pki/ca.crt}
	IPv4    netip.Addr
	IPv6    netip.Addr
	Index   int
	// PodCIDRs are the node's pod ranges, IPv4 first.
	PodCIDRs []netip.Prefix

	cp        *ControlPlane
	slots     map[int]*Pod
	xdpMu     sync.Mutex
	xdpPass   link.Link // AcceptXDPTx's program on the bridge port
	xdpPushed bool      // its detach is on cp.cleanup
}

// Valid node indexes: 198.18.0.(10+index) must stay a host address of the /24.
const (
	minNodeIndex = 0
	maxNodeIndex = 244
)

var nodeNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$`)

// NodeIPs returns the LAN addresses of node index.
func NodeIPs(index int) (v4, v6 netip.Addr) {
	return netip.AddrFrom4([4]byte{198, 18, 0, byte(10 + index)}), mnemonicV6("fd6b:7072::%d", 10+index)
}

// NodePodCIDRs returns the pod CIDRs of node index: 10.244.<index>.0/24 and fd6b:7072:244:<index>::/64.
func NodePodCIDRs(index int) (v4, v6 netip.Prefix) {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(index), 0}), 24),
		netip.PrefixFrom(mnemonicV6("fd6b:7072:244:%d::", index), 64)
}

// mnemonicV6 writes decimal numbers as hex text, the convention of docs/ARCHITECTURE.md
// (node 11 is fd6b:7072::11).
func mnemonicV6(format string, args ...any) netip.Addr {
	return netip.MustParseAddr(fmt.Sprintf(format, args...))
}

// AddNode creates node namespace "<prefix>-<name>" on the test LAN with address index 10+index,
// writes its kubeadm files and registers the Node object (pod CIDRs, InternalIPs, Ready). Nodes
// reach each other's pod CIDRs directly over the LAN. On failure nothing of the node is left.
func (cp *ControlPlane) AddNode(ctx context.Context, name string, index int) (*Node, error) {
	if !nodeNameRE.MatchString(name) {
		return nil, fmt.Errorf("sandbox: node name %q: want a short DNS label (at most 20 characters)", name)
	}
	if index < minNodeIndex || index > maxNodeIndex {
		return nil, fmt.Errorf("sandbox: node index %d out of range %d..%d", index, minNodeIndex, maxNodeIndex)
	}
	cp.topo.Lock()
	defer cp.topo.Unlock()
	if cp.isClosed() {
		return nil, fmt.Errorf("sandbox: closed")
	}
	if _, ok := cp.nodes[name]; ok {
		return nil, fmt.Errorf("sandbox: node %s exists", name)
	}
	if other, ok := cp.indexes[index]; ok {
		return nil, fmt.Errorf("sandbox: node index %d is taken by %s", index, other.Name)
	}
	v4, v6 := NodeIPs(index)
	if h := cp.hostWithAddr(v4); h != nil {
		return nil, fmt.Errorf("sandbox: node index %d has the addresses of external host %s", index, h.Name)
	}
	if h := cp.hostWithName(name); h != nil {
		return nil, fmt.Errorf("sandbox: node %s: an external host has that name", name)
	}
	cidr4, cidr6 := NodePodCIDRs(index)
	n := &Node{
		Name:     name,
		NS:       cp.Prefix + "-" + name,
		NodeDir:  filepath.Join(cp.WorkDir, "nodes", name),
		IPv4:     v4,
		IPv6:     v6,
		Index:    index,
		PodCIDRs: []netip.Prefix{cidr4, cidr6},
		cp:       cp,
		slots:    map[int]*Pod{},
	}
	var cs cleanupStack
	if err := cp.addNode(ctx, &cs, n); err != nil {
		if cerr := cs.unwind(); cerr != nil {
			err = fmt.Errorf("%w (cleanup: %v)", err, cerr)
		}
		return nil, fmt.Errorf("sandbox: node %s: %w", name, err)
	}
	cs.moveTo(&cp.cleanup, "node "+name)
	cp.nodes[name] = n
	cp.indexes[index] = n
	cp.log("sandbox: node %s in %s: %s %s", name, n.NS, v4, v6)
	return n, nil
}

func (cp *ControlPlane) addNode(ctx context.Context, cs *cleanupStack, n *Node) error {
	if err := cp.newNamespace(ctx, cs, n.NS,
		"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.forwarding=1"); err != nil {
		return err
	}
	// The bridge end lives in the control-plane namespace; eth0 is created straight in the node.
	bridgePort := fmt.Sprintf("vn%d", n.Index)
	if err := ipIn(ctx, cp.NS, "link", "add", bridgePort, "type", "veth", "peer", "name", "eth0", "netns", n.NS); err != nil {
		return err
	}
	cs.push("delete "+bridgePort, func() error {
		// Gone already when the node namespace went first; deleting either end removes both.
		if _, err := os.Stat(netnsPath(n.NS)); err != nil {
			return nil
		}
		return ipIn(context.Background(), cp.NS, "link", "del", bridgePort)
	})
	if err := ipIn(ctx, cp.NS, "link", "set", bridgePort, "master", "br0", "up"); err != nil {
		return err
	}
	if err := ipBatch(ctx, n.NS,
		[]string{"addr", "add", n.IPv4.String() + "/24", "dev", "eth0"},
		[]string{"-6", "addr", "add", n.IPv6.String() + "/64", "dev", "eth0", "nodad"},
		[]string{"link", "set", "eth0", "up"},
		[]string{"route", "add", "default", "via", ControlPlaneIPv4, "dev", "eth0"},
		[]string{"-6", "route", "add", "default", "via", ControlPlaneIPv6, "dev", "eth0"},
	); err != nil {
		return err
	}
	for _, other := range cp.nodes {
		if err := podRoutes(ctx, n, other); err != nil {
			return err
		}
		if err := podRoutes(ctx, other, n); err != nil {
			return err
		}
		cs.push(fmt.Sprintf("routes from %s to %s's pods", other.Name, n.Name), func() error {
			if _, err := os.Stat(netnsPath(other.NS)); err != nil {
				return nil
			}
			for _, c := range n.PodCIDRs {
				_ = ipIn(context.Background(), other.NS, "route", "del", c.String())
			}
			return nil
		})
	}
	if err := n.writeKubeadmFiles(); err != nil {
		return err
	}
	return n.register(ctx)
}

// podRoutes routes from's traffic for to's pod CIDRs straight to "to" over the LAN.
func podRoutes(ctx context.Context, from, to *Node) error {
	return ipBatch(ctx, from.NS,
		[]string{"route", "add", to.PodCIDRs[0].String(), "via", to.IPv4.String(), "dev", "eth0"},
		[]string{"-6", "route", "add", to.PodCIDRs[1].String(), "via", to.IPv6.String(), "dev", "eth0"},
	)
}

// KubeletConf is the node's kubelet.conf (system:node:<name>, group system:nodes).
func (n *Node) KubeletConf() string {
	return filepath.Join(n.NodeDir, "etc", "kubernetes", "kubelet.conf")
}

// KubeadmConfig is the node's kubeadm.yaml (a v1beta4 ClusterConfiguration).
func (n *Node) KubeadmConfig() string {
	return filepath.Join(n.NodeDir, "etc", "kubernetes", "kubeadm.yaml")
}

func (n *Node) writeKubeadmFiles() error {
	pk := n.cp.pki
	user := "system:node:" + n.Name
	kp, err := pk.issue(pkix.Name{CommonName: user, Organization: []string{"system:nodes"}}, x509.ExtKeyUsageClientAuth, nil, nil)
	if err != nil {
		return err
	}
	if err := pk.writeKubeconfig(n.KubeletConf(), n.cp.APIServer, user, kp); err != nil {
		return err
	}
	return writeFiles(map[string][]byte{
		n.KubeadmConfig(): []byte(clusterConfiguration),
		filepath.Join(n.NodeDir, "etc", "kubernetes", "pki", "ca.crt"): pk.caPEM,
	})
}

// register creates the Node object and writes the status a kubelet would have.
func (n *Node) register(ctx context.Context) error {
	nodes := n.cp.Client.CoreV1().Nodes()
	obj := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: n.Name,
			Labels: map[string]string{
				"kubernetes.io/hostname": n.Name,
				"kubernetes.io/os":       "linux",
			},
		},
		Spec: v1.NodeSpec{
			PodCIDR:  n.PodCIDRs[0].String(),
			PodCIDRs: []string{n.PodCIDRs[0].String(), n.PodCIDRs[1].String()},
		},
	}
	created, err := nodes.Create(ctx, obj, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create Node: %w", err)
	}
	now := metav1.NewTime(time.Now())
	created.Status = v1.NodeStatus{
		Addresses: []v1.NodeAddress{
			{Type: v1.NodeInternalIP, Address: n.IPv4.String()},
			{Type: v1.NodeInternalIP, Address: n.IPv6.String()},
			{Type: v1.NodeHostName, Address: n.Name},
		},
		Conditions: []v1.NodeCondition{{
			Type: v1.NodeReady, Status: v1.ConditionTrue, Reason: "KubeletReady",
			Message: "sandbox node", LastHeartbeatTime: now, LastTransitionTime: now,
		}},
		NodeInfo: v1.NodeSystemInfo{KubeletVersion: KubernetesVersion, OperatingSystem: "linux", Architecture: "amd64"},
	}
	if _, err := nodes.UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("update Node status: %w", err)
	}
	return nil
}

// RESTConfig returns a client configuration from the node's kubelet.conf whose connections are
// opened inside the node namespace, i.e. what kube-proxy or kpr on that node would get.
func (n *Node) RESTConfig() (*rest.Config, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", n.KubeletConf())
	if err != nil {
		return nil, err
	}
	cfg.Dial = n.DialContext
	cfg.Timeout = 30 * time.Second
	return cfg, nil
}

// DialContext opens a connection from inside the node namespace (IP literals only).
func (n *Node) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return dialInNetns(ctx, netnsPath(n.NS), network, address)
}

// Start runs a long-lived command inside the node namespace via nsenter --net, with stdout and
// stderr in a log file under WorkDir/logs. It runs until Process.Stop, Kill, ControlPlane.Close,
// or until ctx is done.
func (n *Node) Start(ctx context.Context, name string, args ...string) (*Process, error) {
	return n.StartCmd(ctx, Cmd{Name: name, Args: args})
}

// StartCmd is Start with a cgroup and environment.
func (n *Node) StartCmd(ctx context.Context, c Cmd) (*Process, error) {
	return n.cp.procs.start(ctx, n.NS, c, "")
}

// Exec runs a short command inside the node namespace and returns its combined output; a
// cgroupFD > 0 starts it in that cgroup. Bounded by ctx, or one minute without a deadline.
func (n *Node) Exec(ctx context.Context, cgroupFD int, name string, args ...string) ([]byte, error) {
	return n.cp.procs.exec(ctx, n.NS, Cmd{Name: name, Args: args, CgroupFD: cgroupFD})
}
