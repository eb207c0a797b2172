package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"

	"github.com/kpr-dev/kpr/node/kubeproxy"
)

// isKubeProxy tells a kube-proxy pod: kubeadm's DaemonSet labels its pods k8s-app=kube-proxy;
// static-pod installs (GKE-style) use component=kube-proxy or at least the name.
func isKubeProxy(p *v1.Pod) bool {
	if p.Namespace != metav1.NamespaceSystem {
		return false
	}
	return p.Labels["k8s-app"] == "kube-proxy" || p.Labels["component"] == "kube-proxy" || strings.HasPrefix(p.Name, "kube-proxy-") || p.Name == "kube-proxy"
}

// running: not finished and not being deleted.
func running(p *v1.Pod) bool {
	return p.DeletionTimestamp == nil && p.Status.Phase != v1.PodSucceeded && p.Status.Phase != v1.PodFailed
}

// startKubeProxyGuard watches the kube-system pods bound to this node (what the node's own
// credentials may read) for a kube-proxy: a DaemonSet pod (`kubeadm upgrade` reinstalled the
// addon) or a static pod's mirror. Both would program Services beside kpr; kpr does not fight
// it, but says so: a warning in its log, a Warning Event on the Node, and `kpr status`.
func (a *Agent) startKubeProxyGuard(ctx context.Context) {
	f := informers.NewSharedInformerFactoryWithOptions(a.client, 0,
		informers.WithNamespace(metav1.NamespaceSystem),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", a.node.Name).String()
		}))
	pods := f.Core().V1().Pods().Informer()
	check := func(any) {
		a.checkKubeProxy(ctx, pods.GetStore())
		if pods.HasSynced() {
			// iptables-save and -restore may take a while: not in the event handler.
			go a.cleanLeftoversOnce(ctx)
		}
	}
	_, _ = pods.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    check,
		UpdateFunc: func(_, o any) { check(o) },
		DeleteFunc: check,
	})
	f.Start(ctx.Done())
	// A node without any kube-system pod gets no event: clean once the list is in.
	go func() {
		if cache.WaitForCacheSync(ctx.Done(), pods.HasSynced) {
			check(nil)
		}
	}()
}

// cleanLeftoversOnce removes what kube-proxy left in this node's kernel, once per run, when
// cleanKubeProxyLeftovers is on, the API shows no kube-proxy pod on this node and no
// kube-proxy process runs in its network namespace (one run as a host service, say).
func (a *Agent) cleanLeftoversOnce(ctx context.Context) {
	if !a.cfg.CleanKubeProxyLeftovers {
		return
	}
	a.mu.Lock()
	if a.leftoversCleaned || a.kubeProxySeen != "" {
		a.mu.Unlock()
		return
	}
	a.leftoversCleaned = true
	a.mu.Unlock()
	if pids := kubeproxy.Processes(); len(pids) > 0 {
		a.log.Warn("a kube-proxy process runs in this network namespace; its rules are left alone", "pids", pids)
		return
	}
	r, err := kubeproxy.Clean(ctx)
	if len(r.Removed) > 0 {
		a.log.Info("removed what kube-proxy left on this node", "removed", r.Removed)
	}
	for _, s := range r.Skipped {
		a.log.Info("kube-proxy leftovers not checked", "what", s)
	}
	if err != nil {
		a.log.Warn("removing kube-proxy's leftovers", "err", err)
	}
}

// checkKubeProxy updates the guard's state from the pods in store.
func (a *Agent) checkKubeProxy(ctx context.Context, store cache.Store) {
	var found []string
	for _, obj := range store.List() {
		if p, ok := obj.(*v1.Pod); ok && isKubeProxy(p) && running(p) {
			found = append(found, p.Namespace+"/"+p.Name)
		}
	}
	slices.Sort(found)
	now := ""
	if len(found) > 0 {
		now = fmt.Sprintf("kube-proxy runs on this node (pod %s): it and kpr both program Services; remove it (kpr kubeadm migrate, then kpr kubeadm clean-node)", strings.Join(found, ", "))
	}
	a.mu.Lock()
	was := a.kubeProxySeen
	a.kubeProxySeen = now
	a.mu.Unlock()
	if now == was {
		return
	}
	a.status.set(func(s *Status) { s.KubeProxy = now })
	if now == "" {
		a.log.Info("kube-proxy no longer runs on this node")
		return
	}
	a.log.Warn(now)
	ev := &v1.Event{
		ObjectMeta:     metav1.ObjectMeta{GenerateName: a.node.Name + ".kpr-", Namespace: metav1.NamespaceDefault},
		InvolvedObject: v1.ObjectReference{Kind: "Node", Name: a.node.Name, UID: "", APIVersion: "v1"},
		Reason:         "KubeProxyRunning",
		Message:        now,
		Type:           v1.EventTypeWarning,
		Source:         v1.EventSource{Component: "kpr", Host: a.node.Name},
		FirstTimestamp: metav1.NewTime(time.Now()),
		LastTimestamp:  metav1.NewTime(time.Now()),
		Count:          1,
	}
	go func() {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if _, err := a.client.CoreV1().Events(metav1.NamespaceDefault).Create(ctx, ev, metav1.CreateOptions{}); err != nil {
			a.log.Warn("could not record the Event about kube-proxy", "err", err)
		}
	}()
}
