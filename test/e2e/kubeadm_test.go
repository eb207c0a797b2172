package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/kpr-dev/kpr/test/sandbox"
)

// TestKubeadmSetup: in a cluster made without kube-proxy's addon (the sandbox without its
// proxy RBAC), a node's kubelet credentials cannot read EndpointSlices and kpr cannot sync.
// `kpr kubeadm setup`, run with the admin kubeconfig on the control plane, grants them; run
// again it changes nothing, and a binding someone changed is put back.
func TestKubeadmSetup(t *testing.T) {
	requireE2E(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	work := t.TempDir()
	cp, err := sandbox.Start(ctx, sandbox.Options{WorkDir: work + "/sandbox", Log: t.Logf, NoProxyRBAC: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cp.Close(); err != nil {
			t.Errorf("sandbox close: %v", err)
		}
	})
	node, err := cp.AddNode(ctx, "node1", 1)
	if err != nil {
		t.Fatal(err)
	}
	bin, err := sandbox.BuildKpr(work)
	if err != nil {
		t.Fatal(err)
	}
	k, err := node.NewKpr(bin)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := k.Close(); err != nil {
			t.Errorf("kpr: %v", err)
		}
	})
	cfg, err := node.RESTConfig()
	if err != nil {
		t.Fatal(err)
	}
	asNode := kubernetes.NewForConfigOrDie(cfg)
	if _, err := asNode.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{Limit: 1}); !apierrors.IsForbidden(err) {
		t.Fatalf("before setup, the node lists EndpointSlices: %v; want Forbidden", err)
	}
	if err := k.Start(ctx, 5*time.Second); err == nil {
		t.Fatal("before setup, kpr synced with the node's credentials")
	}
	if err := k.Stop(); err != nil {
		t.Logf("stopping the kpr that could not sync: %v", err)
	}

	setup := func() string {
		t.Helper()
		out, err := cp.Exec(ctx, 0, bin, "kubeadm", "setup", "--kubeconfig", cp.AdminKubeconfig)
		if err != nil {
			t.Fatalf("kpr kubeadm setup: %v\n%s", err, out)
		}
		return string(out)
	}
	if out := setup(); !strings.Contains(out, "ClusterRoleBinding kpr:node-proxier created") {
		t.Errorf("first setup: %q", out)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := asNode.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{Limit: 1})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after setup, the node still cannot list EndpointSlices: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if _, err := asNode.CoreV1().Services("").List(ctx, metav1.ListOptions{Limit: 1}); err != nil {
		t.Errorf("after setup, listing Services: %v", err)
	}
	if err := k.Start(ctx, 30*time.Second); err != nil {
		t.Fatalf("after setup, kpr does not sync with the node's credentials: %v", err)
	}

	if out := setup(); !strings.Contains(out, "unchanged") {
		t.Errorf("second setup: %q, want unchanged", out)
	}
	crbs := cp.Client.RbacV1().ClusterRoleBindings()
	crb, err := crbs.Get(ctx, "kpr:node-proxier", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	crb.Subjects = []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.GroupKind, Name: "someone-else"}}
	if _, err := crbs.Update(ctx, crb, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if out := setup(); !strings.Contains(out, "updated") {
		t.Errorf("setup after the binding was changed: %q, want updated", out)
	}
	if crb, err := crbs.Get(ctx, "kpr:node-proxier", metav1.GetOptions{}); err != nil || len(crb.Subjects) != 1 || crb.Subjects[0].Name != "system:nodes" {
		t.Errorf("binding after setup: %+v %v", crb, err)
	}
}
