package bench

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"

	"github.com/kpr-dev/kpr/test/sandbox"
)

// Filler endpoints take addresses from the pod CIDR 10.244.0.0/16 after node1's 10.244.1.0/24:
// offsets fillBase..fillBase+fillAddrs-1. Past fillAddrs endpoints the port changes instead,
// so every (address, port) stays unique, as it would be in a real cluster, as long as the
// endpoints per Service divide fillAddrs (10 does: a slice has one port).
const (
	fillBase  = 512   // 10.244.2.0
	fillAddrs = 65000 // up to 10.244.255.231
)

var podNet = netip.MustParseAddr("10.244.0.0").As4()

// fillEndpoint is the address and port of endpoint j of filler Service i (1-based).
func fillEndpoint(i, j, perService int) (netip.Addr, int32) {
	g := (i-1)*perService + j
	off := fillBase + g%fillAddrs
	a := podNet
	a[2] += byte(off >> 8)
	a[3] += byte(off)
	return netip.AddrFrom4(a), int32(10000 + g/fillAddrs)
}

func clusterIPService(namespace, name string) *v1.Service {
	return &v1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace},
		Spec: v1.ServiceSpec{
			Type:           v1.ServiceTypeClusterIP,
			IPFamilyPolicy: ptr.To(v1.IPFamilyPolicySingleStack),
			IPFamilies:     []v1.IPFamily{v1.IPv4Protocol},
			Ports:          []v1.ServicePort{{Name: "http", Port: servicePort, TargetPort: intstr.FromInt32(backendPort), Protocol: v1.ProtocolTCP}},
		},
	}
}

func endpointSlice(namespace, service string, port int32, addrs []netip.Addr, node string) *discovery.EndpointSlice {
	s := &discovery.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name:      service + "-v4",
			Namespace: namespace,
			Labels:    map[string]string{discovery.LabelServiceName: service, discovery.LabelManagedBy: "kpr-bench"},
		},
		AddressType: discovery.AddressTypeIPv4,
		Ports:       []discovery.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(port), Protocol: ptr.To(v1.ProtocolTCP)}},
	}
	for _, a := range addrs {
		ep := discovery.Endpoint{Addresses: []string{a.String()}, Conditions: discovery.EndpointConditions{Ready: ptr.To(true)}}
		if node != "" {
			ep.NodeName = ptr.To(node)
		}
		s.Endpoints = append(s.Endpoints, ep)
	}
	return s
}

// createMeasured creates bench/web with the backend pods (on backendNode) as its endpoints:
// a ClusterIP Service, or for the NodePort scenario a NodePort one (externalTrafficPolicy
// Cluster, so node1 forwards to node2's pods with SNAT).
func (b *bench) createMeasured(ctx context.Context, backendNode *sandbox.Node) error {
	api := b.cp.Client
	want := clusterIPService(measuredNamespace, measuredService)
	if b.cfg.Scenario == NodePort {
		want.Spec.Type = v1.ServiceTypeNodePort
		want.Spec.ExternalTrafficPolicy = v1.ServiceExternalTrafficPolicyCluster
	}
	svc, err := api.CoreV1().Services(measuredNamespace).Create(ctx, want, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("Service %s/%s: %w", measuredNamespace, measuredService, err)
	}
	vip, err := netip.ParseAddr(svc.Spec.ClusterIP)
	if err != nil {
		return fmt.Errorf("Service %s/%s ClusterIP %q: %w", measuredNamespace, measuredService, svc.Spec.ClusterIP, err)
	}
	b.svcTarget = target(vip, servicePort)
	if b.cfg.Scenario == NodePort {
		if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].NodePort == 0 {
			return fmt.Errorf("Service %s/%s: no nodePort allocated: %+v", measuredNamespace, measuredService, svc.Spec.Ports)
		}
		b.svcTarget = target(b.node.IPv4, int(svc.Spec.Ports[0].NodePort))
	}
	var addrs []netip.Addr
	for _, p := range b.backends {
		addrs = append(addrs, p.IPv4)
	}
	if _, err := api.DiscoveryV1().EndpointSlices(measuredNamespace).Create(ctx,
		endpointSlice(measuredNamespace, measuredService, backendPort, addrs, backendNode.Name), metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("EndpointSlice of %s/%s: %w", measuredNamespace, measuredService, err)
	}
	b.log("Service %s/%s (%s): %s -> %d pods:%d on %s", measuredNamespace, measuredService, svc.Spec.Type, b.svcTarget, len(addrs), backendPort, backendNode.Name)
	return nil
}

// grow creates filler Services (and their EndpointSlices) until the cluster holds sr.Services
// of them, counting the measured one, with a few requests in flight at a time.
func (b *bench) grow(ctx context.Context, sr *ScaleResult) error {
	want := sr.Services - 1
	if want <= b.fillers {
		return nil
	}
	cfg := rest.CopyConfig(b.cp.RESTConfig)
	cfg.QPS, cfg.Burst = 5000, 5000
	// Protobuf costs the API server (which shares the CPUs) far less than JSON.
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	api, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	if _, err := b.cp.Client.CoreV1().Namespaces().Create(ctx, &v1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: fillNamespace}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	b.log("creating Services %d..%d (%d at a time)", b.fillers+1, want, b.cfg.CreateParallelism)
	start := time.Now()
	next := make(chan int)
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var done atomic.Int64
	var wg sync.WaitGroup
	for range b.cfg.CreateParallelism {
		wg.Go(func() {
			for i := range next {
				if err := b.createFiller(ctx, api, i); err != nil {
					cancel(err)
					return
				}
				if n := done.Add(1); n%2000 == 0 {
					b.log("  %d Services created (%s)", n, time.Since(start).Round(time.Second))
				}
			}
		})
	}
feed:
	for i := b.fillers + 1; i <= want; i++ {
		select {
		case next <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		return fmt.Errorf("creating Services: %w", err)
	}
	created := want - b.fillers
	b.fillers = want
	sr.Created = created
	sr.CreateSeconds = time.Since(start).Seconds()
	b.log("created %d Services and EndpointSlices in %s", created, time.Since(start).Round(time.Millisecond))
	return nil
}

// createFiller creates filler Service i and its slice, retrying transient API errors a few times.
func (b *bench) createFiller(ctx context.Context, api kubernetes.Interface, i int) error {
	name := fmt.Sprintf("fill-%05d", i)
	addrs := make([]netip.Addr, b.cfg.EndpointsPerService)
	var port int32
	for j := range addrs {
		addrs[j], port = fillEndpoint(i, j, b.cfg.EndpointsPerService)
	}
	create := func(what string, fn func(context.Context) error) error {
		var err error
		for attempt := range 5 {
			if attempt > 0 {
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(time.Duration(attempt) * 200 * time.Millisecond):
				}
			}
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			err = fn(cctx)
			cancel()
			if err == nil || apierrors.IsAlreadyExists(err) {
				return nil
			}
			if ctx.Err() != nil || !(apierrors.IsServerTimeout(err) || apierrors.IsTooManyRequests(err) ||
				apierrors.IsTimeout(err) || apierrors.IsInternalError(err) || apierrors.IsServiceUnavailable(err) || errors.Is(err, context.DeadlineExceeded)) {
				break
			}
		}
		return fmt.Errorf("%s %s/%s: %w", what, fillNamespace, name, err)
	}
	if err := create("Service", func(ctx context.Context) error {
		_, err := api.CoreV1().Services(fillNamespace).Create(ctx, clusterIPService(fillNamespace, name), metav1.CreateOptions{})
		return err
	}); err != nil {
		return err
	}
	return create("EndpointSlice", func(ctx context.Context) error {
		_, err := api.DiscoveryV1().EndpointSlices(fillNamespace).Create(ctx, endpointSlice(fillNamespace, name, port, addrs, ""), metav1.CreateOptions{})
		return err
	})
}
