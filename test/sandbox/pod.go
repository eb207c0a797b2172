package sandbox

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Pod gateway addresses, held by the node side of every pod veth (as Calico does): the pod's
// default routes point at them, so pod routing needs no per-node configuration.
const (
	PodGatewayIPv4 = "169.254.1.1"
	PodGatewayIPv6 = "fe80::1"
)

// PodImage is what the Pod objects claim to run; nothing pulls or runs it.
const PodImage = "registry.k8s.io/pause:3.10"

// Pod is a network namespace standing in for a pod on a node.
type Pod struct {
	Namespace string // Kubernetes namespace
	Name      string
	NS        string // network namespace
	IPv4      netip.Addr
	IPv6      netip.Addr
	Node      *Node
	Slot      int
	HostVeth  string // node side of the pod's veth, in the node namespace
}

// PodIPs returns the addresses of pod slot on node index: 10.244.<index>.<slot> and
// fd6b:7072:244:<index>::<slot>.
func PodIPs(index, slot int) (v4, v6 netip.Addr) {
	return netip.AddrFrom4([4]byte{10, 244, byte(index), byte(slot)}), mnemonicV6("fd6b:7072:244:%d::%d", index, slot)
}

// AddPod creates pod namespace "<prefix>-<node>-<slot>" with a point-to-point veth to the node,
// creates the Pod object (Kubernetes namespace created if missing) bound to the node, and marks
// it Running and Ready with its pod IPs. slot is 1..254 and unique per node. On failure nothing
// of the pod is left.
func (n *Node) AddPod(ctx context.Context, namespace, name string, slot int) (*Pod, error) {
	if slot < 1 || slot > 254 {
		return nil, fmt.Errorf("sandbox: pod slot %d out of range 1..254", slot)
	}
	cp := n.cp
	cp.topo.Lock()
	defer cp.topo.Unlock()
	if cp.isClosed() {
		return nil, fmt.Errorf("sandbox: closed")
	}
	if other, ok := n.slots[slot]; ok {
		return nil, fmt.Errorf("sandbox: slot %d on %s is taken by %s/%s", slot, n.Name, other.Namespace, other.Name)
	}
	v4, v6 := PodIPs(n.Index, slot)
	p := &Pod{
		Namespace: namespace,
		Name:      name,
		NS:        fmt.Sprintf("%s-%d", n.NS, slot),
		IPv4:      v4,
		IPv6:      v6,
		Node:      n,
		Slot:      slot,
		HostVeth:  fmt.Sprintf("p%ds%d", n.Index, slot),
	}
	var cs cleanupStack
	if err := p.create(ctx, &cs); err != nil {
		if cerr := cs.unwind(); cerr != nil {
			err = fmt.Errorf("%w (cleanup: %v)", err, cerr)
		}
		return nil, fmt.Errorf("sandbox: pod %s/%s: %w", namespace, name, err)
	}
	cs.moveTo(&cp.cleanup, fmt.Sprintf("pod %s/%s", namespace, name))
	n.slots[slot] = p
	cp.log("sandbox: pod %s/%s in %s: %s %s", namespace, name, p.NS, v4, v6)
	return p, nil
}

func (p *Pod) create(ctx context.Context, cs *cleanupStack) error {
	n := p.Node
	if err := n.cp.newNamespace(ctx, cs, p.NS); err != nil {
		return err
	}
	if err := ipIn(ctx, n.NS, "link", "add", p.HostVeth, "type", "veth", "peer", "name", "eth0", "netns", p.NS); err != nil {
		return err
	}
	// Node-originated traffic to the pod leaves from the node's LAN address, not from the
	// gateway address on the veth, so servers see the node as the node.
	if err := ipBatch(ctx, n.NS,
		[]string{"addr", "add", PodGatewayIPv4 + "/32", "dev", p.HostVeth, "scope", "link"},
		[]string{"-6", "addr", "add", PodGatewayIPv6 + "/64", "dev", p.HostVeth, "nodad"},
		[]string{"link", "set", p.HostVeth, "up"},
	); err != nil {
		return err
	}
	if err := ipBatch(ctx, p.NS,
		[]string{"addr", "add", p.IPv4.String() + "/32", "dev", "eth0"},
		[]string{"-6", "addr", "add", p.IPv6.String() + "/128", "dev", "eth0", "nodad"},
		[]string{"link", "set", "eth0", "up"},
		[]string{"route", "add", "default", "via", PodGatewayIPv4, "dev", "eth0", "onlink"},
		[]string{"-6", "route", "add", "default", "via", PodGatewayIPv6, "dev", "eth0"},
	); err != nil {
		return err
	}
	if err := ipBatch(ctx, n.NS,
		[]string{"route", "add", p.IPv4.String() + "/32", "dev", p.HostVeth, "src", n.IPv4.String()},
		[]string{"-6", "route", "add", p.IPv6.String() + "/128", "dev", p.HostVeth, "src", n.IPv6.String()},
	); err != nil {
		return err
	}
	return p.register(ctx)
}

// register creates the Pod object and writes the status a kubelet would have.
func (p *Pod) register(ctx context.Context) error {
	cp := p.Node.cp
	if err := cp.ensureNamespace(ctx, p.Namespace); err != nil {
		return err
	}
	pods := cp.Client.CoreV1().Pods(p.Namespace)
	zero := int64(0)
	no := false
	obj := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, Labels: map[string]string{"app": p.Name}},
		Spec: v1.PodSpec{
			NodeName:                      p.Node.Name,
			Containers:                    []v1.Container{{Name: "main", Image: PodImage}},
			TerminationGracePeriodSeconds: &zero,
			AutomountServiceAccountToken:  &no,
			EnableServiceLinks:            &no,
		},
	}
	created, err := pods.Create(ctx, obj, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create Pod: %w", err)
	}
	now := metav1.Now()
	cond := func(t v1.PodConditionType) v1.PodCondition {
		return v1.PodCondition{Type: t, Status: v1.ConditionTrue, LastTransitionTime: now}
	}
	created.Status = v1.PodStatus{
		Phase:   v1.PodRunning,
		HostIP:  p.Node.IPv4.String(),
		HostIPs: []v1.HostIP{{IP: p.Node.IPv4.String()}, {IP: p.Node.IPv6.String()}},
		PodIP:   p.IPv4.String(),
		PodIPs:  []v1.PodIP{{IP: p.IPv4.String()}, {IP: p.IPv6.String()}},
		Conditions: []v1.PodCondition{
			cond(v1.PodScheduled), cond(v1.PodInitialized), cond(v1.ContainersReady), cond(v1.PodReady),
		},
		StartTime: &now,
		ContainerStatuses: []v1.ContainerStatus{{
			Name: "main", Image: PodImage, ImageID: PodImage, Ready: true,
			State: v1.ContainerState{Running: &v1.ContainerStateRunning{StartedAt: now}},
		}},
	}
	if _, err := pods.UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("update Pod status: %w", err)
	}
	return nil
}

// DialContext opens a connection from inside the pod namespace (IP literals only).
func (p *Pod) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return dialInNetns(ctx, netnsPath(p.NS), network, address)
}

// Start runs a long-lived command inside the pod namespace (see Node.Start).
func (p *Pod) Start(ctx context.Context, name string, args ...string) (*Process, error) {
	return p.StartCmd(ctx, Cmd{Name: name, Args: args})
}

// StartCmd is Start with a cgroup and environment.
func (p *Pod) StartCmd(ctx context.Context, c Cmd) (*Process, error) {
	return p.Node.cp.procs.start(ctx, p.NS, c, "")
}

// Exec runs a short command inside the pod namespace (see Node.Exec).
func (p *Pod) Exec(ctx context.Context, cgroupFD int, name string, args ...string) ([]byte, error) {
	return p.Node.cp.procs.exec(ctx, p.NS, Cmd{Name: name, Args: args, CgroupFD: cgroupFD})
}
