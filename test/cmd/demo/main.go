// Command demo runs kpr's main job on a local sandbox: a real etcd and kube-apiserver, a node
// and pods made of network namespaces, kpr on the node, and a Service answered through its
// ClusterIP. It removes everything when it ends (or on Ctrl-C). `make demo` runs it.
package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/kpr-dev/kpr/test/sandbox"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) { fmt.Printf("\n==> "+format+"\n", args...) }

func run() (err error) {
	if os.Geteuid() != 0 {
		return fmt.Errorf("the demo creates network namespaces and loads BPF programs: run it as root")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()

	work, err := os.MkdirTemp("", "kpr-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)

	step("starting etcd and kube-apiserver in a network namespace")
	cp, err := sandbox.Start(ctx, sandbox.Options{Prefix: "kpr-demo", WorkDir: work, Log: func(f string, a ...any) { fmt.Printf("    "+f+"\n", a...) }})
	if err != nil {
		return err
	}
	defer func() {
		step("cleaning up")
		if cerr := cp.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	node, err := cp.AddNode(ctx, "node1", 1)
	if err != nil {
		return err
	}
	probe, err := sandbox.BuildProbe(work)
	if err != nil {
		return err
	}
	var pods []*sandbox.Pod
	for i, name := range []string{"web-a", "web-b"} {
		p, err := node.AddPod(ctx, "default", name, 2+i)
		if err != nil {
			return err
		}
		if _, err := p.Start(ctx, probe, "serve", "--name", name, "--tcp", "8080"); err != nil {
			return err
		}
		pods = append(pods, p)
	}
	client, err := node.AddPod(ctx, "default", "client", 9)
	if err != nil {
		return err
	}

	step("starting kpr on node1 (its own cgroup and bpffs)")
	bin, err := sandbox.BuildKpr(work)
	if err != nil {
		return err
	}
	k, err := node.NewKpr(bin)
	if err != nil {
		return err
	}
	defer func() {
		if kerr := k.Close(); kerr != nil && err == nil {
			err = kerr
		}
	}()
	if err := k.Start(ctx, 30*time.Second); err != nil {
		return err
	}

	step("creating Service default/web (ClusterIP, dual-stack, port 80 -> 8080) and its EndpointSlices")
	svc, err := cp.Client.CoreV1().Services("default").Create(ctx, &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default"},
		Spec: v1.ServiceSpec{
			IPFamilyPolicy: ptr.To(v1.IPFamilyPolicyPreferDualStack),
			Ports:          []v1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	for _, fam := range []discovery.AddressType{discovery.AddressTypeIPv4, discovery.AddressTypeIPv6} {
		s := &discovery.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Name: "web-" + strings.ToLower(string(fam)), Namespace: "default",
				Labels: map[string]string{discovery.LabelServiceName: "web"}},
			AddressType: fam,
			Ports:       []discovery.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(v1.ProtocolTCP)}},
		}
		for _, p := range pods {
			addr := p.IPv4
			if fam == discovery.AddressTypeIPv6 {
				addr = p.IPv6
			}
			s.Endpoints = append(s.Endpoints, discovery.Endpoint{Addresses: []string{addr.String()},
				Conditions: discovery.EndpointConditions{Ready: ptr.To(true)}, NodeName: ptr.To(node.Name)})
		}
		if _, err := cp.Client.DiscoveryV1().EndpointSlices("default").Create(ctx, s, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	fmt.Printf("    ClusterIPs: %s\n", strings.Join(svc.Spec.ClusterIPs, ", "))

	deadline := time.Now().Add(15 * time.Second)
	var list string
	for {
		list, _ = k.Run(ctx, "service", "list")
		if strings.Count(list, ":8080/tcp") >= 2*len(svc.Spec.ClusterIPs) || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	step("kpr service list")
	fmt.Print(list)
	status, _ := k.Run(ctx, "status")
	step("kpr status")
	fmt.Print(status)

	for _, ip := range svc.Spec.ClusterIPs {
		url := "http://" + netip.AddrPortFrom(netip.MustParseAddr(ip), 80).String() + "/"
		step("curl %s from pod default/client (three requests)", url)
		for range 3 {
			out, err := client.Exec(ctx, k.CgroupFD, "curl", "-sS", "-m", "3", url)
			if err != nil {
				return fmt.Errorf("curl %s: %w", url, err)
			}
			fmt.Printf("    %s\n", strings.TrimSpace(string(out)))
		}
	}
	return nil
}
