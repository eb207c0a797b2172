package kubeadm

import (
	"context"
	"fmt"
	"reflect"

	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// NodeProxierBinding is the ClusterRoleBinding `kpr kubeadm setup` creates: kube-proxy's own
// ClusterRole, system:node-proxier (list and watch Services, EndpointSlices, Endpoints and
// Nodes; write Events), granted to the group system:nodes, so each node's kpr works with the
// node's own kubelet credentials (/etc/kubernetes/kubelet.conf) and needs no identity of its
// own.
//
// The choice: kubeadm's kube-proxy addon gives a ServiceAccount the role and mounts its token
// into the DaemonSet's pods; kpr runs on the host, before kubelet, where no pod token exists.
// A dedicated per-node certificate would need its own issuing and rotation; the kubelet's
// credentials already exist on every node, rotate, and are revoked with the node. What the
// group gains is read access to Services and EndpointSlices (the kubelet can already read
// Services and Nodes) and writing Events.
var NodeProxierBinding = rbacv1.ClusterRoleBinding{
	ObjectMeta: metav1.ObjectMeta{
		Name:   "kpr:node-proxier",
		Labels: map[string]string{"app.kubernetes.io/managed-by": "kpr"},
	},
	RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "system:node-proxier"},
	Subjects: []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.GroupKind, Name: "system:nodes"}},
}

// Setup creates what kpr needs in the cluster that kubeadm's skipped kube-proxy addon would
// have provided: NodeProxierBinding. It is idempotent: an up-to-date binding is left alone, one
// that differs is corrected (recreated when its roleRef, which cannot change, differs). It
// returns what it did, one line per object.
func Setup(ctx context.Context, client kubernetes.Interface) ([]string, error) {
	want := NodeProxierBinding.DeepCopy()
	crbs := client.RbacV1().ClusterRoleBindings()
	if _, err := client.RbacV1().ClusterRoles().Get(ctx, want.RoleRef.Name, metav1.GetOptions{}); err != nil {
		return nil, fmt.Errorf("ClusterRole %s (one of the API server's bootstrap roles): %w", want.RoleRef.Name, err)
	}
	have, err := crbs.Get(ctx, want.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		if _, err := crbs.Create(ctx, want, metav1.CreateOptions{}); err != nil {
			return nil, fmt.Errorf("creating ClusterRoleBinding %s: %w", want.Name, err)
		}
		return []string{fmt.Sprintf("ClusterRoleBinding %s created: ClusterRole %s for group %s", want.Name, want.RoleRef.Name, want.Subjects[0].Name)}, nil
	case err != nil:
		return nil, fmt.Errorf("reading ClusterRoleBinding %s: %w", want.Name, err)
	case have.RoleRef != want.RoleRef:
		if err := crbs.Delete(ctx, want.Name, metav1.DeleteOptions{}); err != nil {
			return nil, fmt.Errorf("replacing ClusterRoleBinding %s (roleRef %s): %w", want.Name, have.RoleRef.Name, err)
		}
		if _, err := crbs.Create(ctx, want, metav1.CreateOptions{}); err != nil {
			return nil, fmt.Errorf("creating ClusterRoleBinding %s: %w", want.Name, err)
		}
		return []string{fmt.Sprintf("ClusterRoleBinding %s recreated: its roleRef was %s", want.Name, have.RoleRef.Name)}, nil
	case !reflect.DeepEqual(have.Subjects, want.Subjects):
		have.Subjects = want.Subjects
		if _, err := crbs.Update(ctx, have, metav1.UpdateOptions{}); err != nil {
			return nil, fmt.Errorf("updating ClusterRoleBinding %s: %w", want.Name, err)
		}
		return []string{fmt.Sprintf("ClusterRoleBinding %s updated: subjects set to group %s", want.Name, want.Subjects[0].Name)}, nil
	}
	return []string{fmt.Sprintf("ClusterRoleBinding %s unchanged", want.Name)}, nil
}
