package kubeadm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"
)

// The objects kubeadm's kube-proxy addon creates that `kpr kubeadm migrate` removes, and the
// ConfigMap in which kubeadm keeps the cluster's configuration for `kubeadm upgrade`.
const (
	kubeProxyName       = "kube-proxy"
	kubeadmConfigMap    = "kubeadm-config"
	daemonSetBackup     = "kube-proxy-daemonset.yaml"
	configMapBackup     = "kube-proxy-configmap.yaml"
	clusterConfigBackup = "kubeadm-config-configmap.yaml"
)

// DefaultBackupDir is where migrate keeps what it removes (on the control-plane node it runs
// on), for rollback.
const DefaultBackupDir = "/var/lib/kpr/kube-proxy-backup"

// Migrate takes a running kubeadm cluster off kube-proxy, as its operators do by hand:
//
//  1. Setup: the RBAC kpr needs, so the nodes' kpr serves before kube-proxy goes;
//  2. the kube-system/kube-proxy DaemonSet and ConfigMap are written to backupDir and deleted
//     (the ConfigMap too: `kubeadm upgrade` reinstalls the addon only while it exists);
//  3. kubeadm's stored ClusterConfiguration (kube-system/kubeadm-config) gets proxy.disabled:
//     true, so no later `kubeadm upgrade` or `kubeadm init phase addon` brings it back.
//
// Running it again finds nothing left to do. kube-proxy leaves its rules in each node's kernel
// when its pods go: `kpr kubeadm clean-node` on each node removes them (node/kubeproxy).
// Rollback undoes it from backupDir.
func Migrate(ctx context.Context, client kubernetes.Interface, backupDir string) ([]string, error) {
	done, err := Setup(ctx, client)
	if err != nil {
		return done, err
	}
	if err := os.MkdirAll(backupDir, 0o700); err != nil {
		return done, err
	}
	ds, err := client.AppsV1().DaemonSets(metav1.NamespaceSystem).Get(ctx, kubeProxyName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		done = append(done, "DaemonSet kube-system/kube-proxy: not there")
		ds = nil
	case err != nil:
		return done, fmt.Errorf("reading DaemonSet kube-system/kube-proxy: %w", err)
	}
	cm, err := client.CoreV1().ConfigMaps(metav1.NamespaceSystem).Get(ctx, kubeProxyName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		done = append(done, "ConfigMap kube-system/kube-proxy: not there")
		cm = nil
	case err != nil:
		return done, fmt.Errorf("reading ConfigMap kube-system/kube-proxy: %w", err)
	}
	// Both backups are written before anything is deleted.
	if ds != nil {
		ds.APIVersion, ds.Kind = "apps/v1", "DaemonSet"
		ds.Status = appsv1.DaemonSetStatus{}
		path, err := writeBackup(backupDir, daemonSetBackup, ds)
		if err != nil {
			return done, err
		}
		done = append(done, "DaemonSet kube-system/kube-proxy saved to "+path)
	}
	if cm != nil {
		cm.APIVersion, cm.Kind = "v1", "ConfigMap"
		path, err := writeBackup(backupDir, configMapBackup, cm)
		if err != nil {
			return done, err
		}
		done = append(done, "ConfigMap kube-system/kube-proxy saved to "+path)
	}
	if ds != nil {
		if err := client.AppsV1().DaemonSets(metav1.NamespaceSystem).Delete(ctx, kubeProxyName, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return done, fmt.Errorf("deleting DaemonSet kube-system/kube-proxy: %w", err)
		}
		done = append(done, "DaemonSet kube-system/kube-proxy deleted (its pods go with it; kube-proxy leaves its rules on each node: run kpr kubeadm clean-node there)")
	}
	if cm != nil {
		if err := client.CoreV1().ConfigMaps(metav1.NamespaceSystem).Delete(ctx, kubeProxyName, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return done, fmt.Errorf("deleting ConfigMap kube-system/kube-proxy: %w", err)
		}
		done = append(done, "ConfigMap kube-system/kube-proxy deleted")
	}
	line, err := disableProxyInClusterConfig(ctx, client, backupDir)
	if line != "" {
		done = append(done, line)
	}
	return done, err
}

// disableProxyInClusterConfig sets proxy.disabled: true in the ClusterConfiguration that
// kubeadm keeps in kube-system/kubeadm-config, after saving the ConfigMap.
func disableProxyInClusterConfig(ctx context.Context, client kubernetes.Interface, backupDir string) (string, error) {
	cms := client.CoreV1().ConfigMaps(metav1.NamespaceSystem)
	cm, err := cms.Get(ctx, kubeadmConfigMap, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return "ConfigMap kube-system/kubeadm-config: not there (not a kubeadm cluster?); nothing keeps kubeadm upgrade from the addon but the missing kube-proxy ConfigMap", nil
	}
	if err != nil {
		return "", fmt.Errorf("reading ConfigMap kube-system/kubeadm-config: %w", err)
	}
	stored, ok := cm.Data["ClusterConfiguration"]
	if !ok {
		return "", errors.New("ConfigMap kube-system/kubeadm-config has no ClusterConfiguration")
	}
	if strings.Contains(stored, "apiVersion: kubeadm.k8s.io/v1beta3") {
		// v1beta3 has no proxy.disabled (skipPhases belongs to kubeadm init's own file).
		return "ConfigMap kube-system/kubeadm-config: a v1beta3 ClusterConfiguration has no proxy.disabled; the missing kube-proxy ConfigMap is what keeps kubeadm upgrade from the addon", nil
	}
	patched, changes, err := SkipKubeProxy("kube-system/kubeadm-config ClusterConfiguration", []byte(stored))
	if err != nil {
		return "", err
	}
	if len(changes) == 0 {
		return "ConfigMap kube-system/kubeadm-config: kube-proxy already disabled", nil
	}
	cm.APIVersion, cm.Kind = "v1", "ConfigMap"
	if _, err := writeBackup(backupDir, clusterConfigBackup, cm); err != nil {
		return "", err
	}
	cm.Data["ClusterConfiguration"] = string(patched)
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		return "", fmt.Errorf("updating ConfigMap kube-system/kubeadm-config: %w", err)
	}
	return "ConfigMap kube-system/kubeadm-config: ClusterConfiguration proxy.disabled: true (saved first), so kubeadm upgrade does not reinstall kube-proxy", nil
}

// writeBackup writes obj, without what the API server owns (uid, resourceVersion, timestamps,
// managed fields), to dir/name. An existing backup is never overwritten: it may be the only
// copy of what an earlier migrate removed.
func writeBackup(dir, name string, obj metav1.Object) (string, error) {
	obj.SetUID("")
	obj.SetResourceVersion("")
	obj.SetGeneration(0)
	obj.SetCreationTimestamp(metav1.Time{})
	obj.SetManagedFields(nil)
	path := filepath.Join(dir, name)
	if _, err := os.Stat(path); err == nil {
		return "", fmt.Errorf("%s exists from an earlier migrate; kpr kubeadm rollback restores it, or move it away", path)
	}
	data, err := yaml.Marshal(obj)
	if err != nil {
		return "", err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return "", err
	}
	return path, os.Rename(tmp, path)
}

// Rollback restores what Migrate removed, from backupDir: kubeadm-config's ClusterConfiguration
// as it was, then the kube-proxy ConfigMap and DaemonSet. Objects that exist are left alone.
// The backups stay. Stop kpr on the nodes (systemctl disable --now kpr; kpr cleanup) once
// kube-proxy runs again.
func Rollback(ctx context.Context, client kubernetes.Interface, backupDir string) ([]string, error) {
	var done []string
	found := false
	var cc v1.ConfigMap
	if ok, err := readBackup(backupDir, clusterConfigBackup, &cc); err != nil {
		return done, err
	} else if ok {
		found = true
		cms := client.CoreV1().ConfigMaps(metav1.NamespaceSystem)
		cur, err := cms.Get(ctx, kubeadmConfigMap, metav1.GetOptions{})
		if err != nil {
			return done, fmt.Errorf("reading ConfigMap kube-system/kubeadm-config: %w", err)
		}
		cur.Data["ClusterConfiguration"] = cc.Data["ClusterConfiguration"]
		if _, err := cms.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			return done, fmt.Errorf("restoring ConfigMap kube-system/kubeadm-config: %w", err)
		}
		done = append(done, "ConfigMap kube-system/kubeadm-config: ClusterConfiguration restored")
	}
	var cm v1.ConfigMap
	if ok, err := readBackup(backupDir, configMapBackup, &cm); err != nil {
		return done, err
	} else if ok {
		found = true
		_, err := client.CoreV1().ConfigMaps(metav1.NamespaceSystem).Create(ctx, &cm, metav1.CreateOptions{})
		line, err := restored("ConfigMap kube-system/kube-proxy", err)
		if err != nil {
			return done, err
		}
		done = append(done, line)
	}
	var ds appsv1.DaemonSet
	if ok, err := readBackup(backupDir, daemonSetBackup, &ds); err != nil {
		return done, err
	} else if ok {
		found = true
		_, err := client.AppsV1().DaemonSets(metav1.NamespaceSystem).Create(ctx, &ds, metav1.CreateOptions{})
		line, err := restored("DaemonSet kube-system/kube-proxy", err)
		if err != nil {
			return done, err
		}
		done = append(done, line)
	}
	if !found {
		return done, fmt.Errorf("no backup in %s (kpr kubeadm migrate writes them there)", backupDir)
	}
	return done, nil
}

// restored says what creating the object called what from its backup did (err: Create's): an
// object that exists is left alone.
func restored(what string, err error) (string, error) {
	switch {
	case apierrors.IsAlreadyExists(err):
		return what + ": already there, left alone", nil
	case err != nil:
		return "", fmt.Errorf("restoring %s: %w", what, err)
	}
	return what + " restored", nil
}

// readBackup decodes dir/name into obj; false when there is no such file.
func readBackup(dir, name string, obj any) (bool, error) {
	data, err := os.ReadFile(filepath.Join(dir, name))
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if err := yaml.UnmarshalStrict(data, obj); err != nil {
		return false, fmt.Errorf("%s: %w", filepath.Join(dir, name), err)
	}
	return true, nil
}
