package e2e

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	v1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/kpr-dev/kpr/kubeadm"
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
	cp := startSandbox(ctx, t, work, sandbox.Options{NoProxyRBAC: true})
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

// kubeadmAddonObjects renders kubeadm's kube-proxy addon with the real kubeadm (`kubeadm init
// --dry-run`, its files kept in a temporary directory) and returns the objects kubeadm would
// create for it, as YAML by "Kind/name".
func kubeadmAddonObjects(t *testing.T) map[string][]byte {
	t.Helper()
	dir, ok := sandbox.K8sBinDir()
	if !ok {
		t.Fatal("no kubeadm binary")
	}
	kubeadmBin := filepath.Join(dir, "kubeadm")
	tmp := t.TempDir()
	defaults, err := exec.Command(kubeadmBin, "config", "print", "init-defaults").Output()
	if err != nil {
		t.Fatalf("kubeadm config print init-defaults: %v", err)
	}
	cfg := filepath.Join(tmp, "init.yaml")
	if err := os.WriteFile(cfg, defaults, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(kubeadmBin, "init", "--dry-run", "--config", cfg, "--skip-phases", "preflight")
	cmd.Env = append(os.Environ(), "KUBEADM_INIT_DRYRUN_DIR="+filepath.Join(tmp, "dryrun"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("kubeadm init --dry-run: %v\n%s", err, out)
	}
	objs := map[string][]byte{}
	for _, block := range strings.Split(string(out), "[dryrun] Attached object:\n")[1:] {
		// The object runs up to the next line that kubeadm prints itself.
		var lines []string
		for _, line := range strings.Split(block, "\n") {
			if strings.HasPrefix(line, "[") {
				break
			}
			lines = append(lines, line)
		}
		doc := []byte(strings.Join(lines, "\n"))
		var meta struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(doc, &meta); err != nil || meta.Kind == "" {
			continue
		}
		key := meta.Kind + "/" + meta.Metadata.Name
		switch key {
		case "ConfigMap/kube-proxy", "DaemonSet/kube-proxy", "ServiceAccount/kube-proxy", "ClusterRoleBinding/kubeadm:node-proxier", "Role/kube-proxy", "RoleBinding/kube-proxy":
			objs[key] = doc
		}
	}
	if len(objs) != 6 {
		t.Fatalf("kubeadm's dry run gave %d of the 6 objects of the kube-proxy addon: %v", len(objs), slices.Collect(maps.Keys(objs)))
	}
	return objs
}

// createAddon creates kubeadm's kube-proxy addon objects in the cluster, as kubeadm init does.
func createAddon(ctx context.Context, t *testing.T, client kubernetes.Interface, objs map[string][]byte) {
	t.Helper()
	decode := func(key string, into any) {
		t.Helper()
		if err := yaml.UnmarshalStrict(objs[key], into); err != nil {
			t.Fatalf("%s from kubeadm: %v", key, err)
		}
	}
	var (
		cm  v1.ConfigMap
		ds  appsv1.DaemonSet
		sa  v1.ServiceAccount
		crb rbacv1.ClusterRoleBinding
		r   rbacv1.Role
		rb  rbacv1.RoleBinding
	)
	decode("ConfigMap/kube-proxy", &cm)
	decode("DaemonSet/kube-proxy", &ds)
	decode("ServiceAccount/kube-proxy", &sa)
	decode("ClusterRoleBinding/kubeadm:node-proxier", &crb)
	decode("Role/kube-proxy", &r)
	decode("RoleBinding/kube-proxy", &rb)
	for what, err := range map[string]error{
		"ConfigMap":          ignoreExists(client.CoreV1().ConfigMaps(cm.Namespace).Create(ctx, &cm, metav1.CreateOptions{})),
		"ServiceAccount":     ignoreExists(client.CoreV1().ServiceAccounts(sa.Namespace).Create(ctx, &sa, metav1.CreateOptions{})),
		"ClusterRoleBinding": ignoreExists(client.RbacV1().ClusterRoleBindings().Create(ctx, &crb, metav1.CreateOptions{})),
		"Role":               ignoreExists(client.RbacV1().Roles(r.Namespace).Create(ctx, &r, metav1.CreateOptions{})),
		"RoleBinding":        ignoreExists(client.RbacV1().RoleBindings(rb.Namespace).Create(ctx, &rb, metav1.CreateOptions{})),
		"DaemonSet":          ignoreExists(client.AppsV1().DaemonSets(ds.Namespace).Create(ctx, &ds, metav1.CreateOptions{})),
	} {
		if err != nil {
			t.Fatalf("creating kubeadm's kube-proxy %s: %v", what, err)
		}
	}
}

func ignoreExists[T any](_ T, err error) error {
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

// TestKubeadmMigrateRollback: a cluster with kubeadm's kube-proxy addon (the objects the
// real kubeadm renders) is taken off kube-proxy by `kpr kubeadm migrate` and put back by
// `kpr kubeadm rollback`, checked on the API objects.
func TestKubeadmMigrateRollback(t *testing.T) {
	requireE2E(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	objs := kubeadmAddonObjects(t)
	work := t.TempDir()
	cp := startSandbox(ctx, t, work, sandbox.Options{NoProxyRBAC: true})
	bin, err := sandbox.BuildKpr(work)
	if err != nil {
		t.Fatal(err)
	}
	api := cp.Client
	createAddon(ctx, t, api, objs)
	origCC, err := api.CoreV1().ConfigMaps("kube-system").Get(ctx, "kubeadm-config", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	origDS, err := api.AppsV1().DaemonSets("kube-system").Get(ctx, "kube-proxy", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	origCM, err := api.CoreV1().ConfigMaps("kube-system").Get(ctx, "kube-proxy", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	backups := filepath.Join(work, "backup")
	kpr := func(args ...string) string {
		t.Helper()
		out, err := cp.Exec(ctx, 0, bin, append(append([]string{"kubeadm"}, args...), "--kubeconfig", cp.AdminKubeconfig, "--backup-dir", backups)...)
		if err != nil {
			t.Fatalf("kpr kubeadm %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		t.Logf("kpr kubeadm %s:\n%s", strings.Join(args, " "), out)
		return string(out)
	}

	kpr("migrate")
	if _, err := api.AppsV1().DaemonSets("kube-system").Get(ctx, "kube-proxy", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("after migrate the kube-proxy DaemonSet: %v; want it gone", err)
	}
	if _, err := api.CoreV1().ConfigMaps("kube-system").Get(ctx, "kube-proxy", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("after migrate the kube-proxy ConfigMap: %v; want it gone", err)
	}
	if _, err := api.RbacV1().ClusterRoleBindings().Get(ctx, "kpr:node-proxier", metav1.GetOptions{}); err != nil {
		t.Errorf("after migrate kpr's ClusterRoleBinding: %v", err)
	}
	cc, err := api.CoreV1().ConfigMaps("kube-system").Get(ctx, "kubeadm-config", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	stored := filepath.Join(work, "cluster-config.yaml")
	if err := os.WriteFile(stored, []byte(cc.Data["ClusterConfiguration"]), 0o600); err != nil {
		t.Fatal(err)
	}
	if skipped, err := kubeadm.KubeProxySkipped(stored); err != nil || !skipped {
		t.Errorf("kubeadm-config after migrate does not disable kube-proxy (%v):\n%s", err, cc.Data["ClusterConfiguration"])
	}
	for _, f := range []string{"kube-proxy-daemonset.yaml", "kube-proxy-configmap.yaml", "kubeadm-config-configmap.yaml"} {
		if st, err := os.Stat(filepath.Join(backups, f)); err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("backup %s: %v %v, want a 0600 file", f, st, err)
		}
	}
	if out := kpr("migrate"); !strings.Contains(out, "DaemonSet kube-system/kube-proxy: not there") || !strings.Contains(out, "already disabled") {
		t.Errorf("a second migrate: %q, want nothing left to do", out)
	}

	kpr("rollback")
	ds, err := api.AppsV1().DaemonSets("kube-system").Get(ctx, "kube-proxy", metav1.GetOptions{})
	if err != nil || !reflect.DeepEqual(ds.Spec.Template.Spec.Containers, origDS.Spec.Template.Spec.Containers) || !reflect.DeepEqual(ds.Labels, origDS.Labels) {
		t.Errorf("after rollback the DaemonSet: %v; containers equal to kubeadm's: %v", err, err == nil && reflect.DeepEqual(ds.Spec.Template.Spec.Containers, origDS.Spec.Template.Spec.Containers))
	}
	cm, err := api.CoreV1().ConfigMaps("kube-system").Get(ctx, "kube-proxy", metav1.GetOptions{})
	if err != nil || !reflect.DeepEqual(cm.Data, origCM.Data) || !reflect.DeepEqual(cm.Annotations, origCM.Annotations) {
		t.Errorf("after rollback the ConfigMap differs from kubeadm's: %v", err)
	}
	if cc, err := api.CoreV1().ConfigMaps("kube-system").Get(ctx, "kubeadm-config", metav1.GetOptions{}); err != nil || cc.Data["ClusterConfiguration"] != origCC.Data["ClusterConfiguration"] {
		t.Errorf("after rollback kubeadm-config differs from before the migration: %v", err)
	}
}

// TestCleanNode: upstream kube-proxy (the pinned build) programs a node in iptables mode and
// in nftables mode and is stopped, leaving its rules, as when its DaemonSet is deleted. `kpr
// kubeadm clean-node` in the node's namespace removes exactly kube-proxy's chains and tables;
// an admin's own iptables chain and nftables table stay.
func TestCleanNode(t *testing.T) {
	requireE2E(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	work := t.TempDir()
	cp := startSandbox(ctx, t, work, sandbox.Options{})
	node, err := cp.AddNode(ctx, "node1", 1)
	if err != nil {
		t.Fatal(err)
	}
	pod, err := node.AddPod(ctx, ns, "web", 1)
	if err != nil {
		t.Fatal(err)
	}
	bin, err := sandbox.BuildKpr(work)
	if err != nil {
		t.Fatal(err)
	}
	dir, _ := sandbox.K8sBinDir()
	kubeProxy := filepath.Join(dir, "kube-proxy")
	svc := service("web", v1.ServicePort{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: v1.ProtocolTCP})
	svc.Spec.Type = v1.ServiceTypeNodePort
	if _, err := cp.Client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Client.DiscoveryV1().EndpointSlices(ns).Create(ctx,
		slice("web", "web-v4", discovery.AddressTypeIPv4, []discovery.EndpointPort{port("http", 8080, v1.ProtocolTCP)}, pod), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// kubelet's static pod directory and kpr's backups, inside the node's own directory.
	nodeFlags := []string{"--manifests-dir", filepath.Join(node.NodeDir, "etc/kubernetes/manifests"), "--backup-dir", filepath.Join(work, "static-backup")}
	sh := func(script string) string {
		t.Helper()
		out, err := node.Exec(ctx, 0, "sh", "-c", script)
		if err != nil {
			t.Fatalf("%s: %v\n%s", script, err, out)
		}
		return string(out)
	}
	// An admin's own rules, which must survive.
	sh("iptables -t nat -N ADMIN && iptables -t nat -A POSTROUTING -s 192.168.0.0/16 -j ADMIN && nft add table inet admin && nft add chain inet admin c")

	// leaveRules runs kube-proxy in mode until it has programmed the Service, then stops it:
	// it leaves its rules, as when its DaemonSet is deleted.
	leaveRules := func(t *testing.T, mode, programmed string) {
		t.Helper()
		kp, err := node.StartCmd(ctx, sandbox.Cmd{Name: kubeProxy, Args: []string{
			"--kubeconfig=" + node.KubeletConf(), "--hostname-override=" + node.Name, "--proxy-mode=" + mode,
			"--cluster-cidr=" + sandbox.PodSubnet, "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
			"--conntrack-tcp-timeout-close-wait=0", "--oom-score-adj=0",
			"--metrics-bind-address=" + netip.AddrPortFrom(node.IPv4, 10249).String(),
			"--healthz-bind-address=" + netip.AddrPortFrom(node.IPv4, 10256).String(),
		}})
		if err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(time.Minute)
		for strings.TrimSpace(sh(programmed)) == "0" {
			if time.Now().After(deadline) || kp.Exited() {
				kp.Stop()
				t.Fatalf("kube-proxy %s did not program the Service: %s", mode, kp.LogTail(2000))
			}
			time.Sleep(200 * time.Millisecond)
		}
		if err := kp.Stop(); err != nil {
			t.Logf("kube-proxy stop: %v", err)
		}
	}
	// leftovers are kube-proxy's chains and tables still there.
	leftovers := func() []string {
		var left []string
		for _, line := range strings.Split(sh("iptables-save; ip6tables-save; nft list tables"), "\n") {
			if (strings.Contains(line, "KUBE-") && !strings.Contains(line, "KUBE-FIREWALL") && !strings.Contains(line, "KUBE-KUBELET-CANARY")) ||
				strings.Contains(line, "table ip kube-proxy") || strings.Contains(line, "table ip6 kube-proxy") {
				left = append(left, line)
			}
		}
		return left
	}
	const iptablesProgrammed = "iptables-save -t nat | grep -c '^:KUBE-SVC-' || true"

	for _, mode := range []struct{ name, programmed string }{
		{"iptables", iptablesProgrammed},
		{"nftables", "nft list tables | grep -c 'kube-proxy' || true"},
	} {
		t.Run(mode.name, func(t *testing.T) {
			leaveRules(t, mode.name, mode.programmed)
			before := sh("iptables-save; ip6tables-save; nft list tables")
			if !strings.Contains(before, "KUBE-") {
				t.Fatalf("no kube-proxy rules left to clean:\n%s", before)
			}
			out, err := node.Exec(ctx, 0, bin, append([]string{"kubeadm", "clean-node"}, nodeFlags...)...)
			if err != nil {
				t.Fatalf("kpr kubeadm clean-node: %v\n%s", err, out)
			}
			t.Logf("kpr kubeadm clean-node:\n%s", out)
			for _, line := range leftovers() {
				t.Errorf("left after clean-node: %s", line)
			}
			after := sh("iptables-save; ip6tables-save; nft list tables")
			for _, keep := range []string{":ADMIN - [0:0]", "-A POSTROUTING -s 192.168.0.0/16 -j ADMIN", "table inet admin"} {
				if !strings.Contains(after, keep) {
					t.Errorf("clean-node removed the admin's %q:\n%s", keep, after)
				}
			}
			if out, err := node.Exec(ctx, 0, bin, append([]string{"kubeadm", "clean-node"}, nodeFlags...)...); err != nil || !strings.Contains(string(out), "nothing of kube-proxy's found") {
				t.Errorf("a second clean-node: %v\n%s", err, out)
			}
		})
	}

	t.Run("kpr run removes them by itself once no kube-proxy runs", func(t *testing.T) {
		leaveRules(t, "iptables", iptablesProgrammed)
		if len(leftovers()) == 0 {
			t.Fatal("no kube-proxy rules left to clean")
		}
		k, err := node.NewKpr(bin)
		if err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := k.Close(); err != nil {
				t.Errorf("kpr: %v", err)
			}
		}()
		if err := k.Start(ctx, 30*time.Second); err != nil {
			t.Fatal(err)
		}
		eventually(t, 10*time.Second, "kpr removes kube-proxy's leftovers", func() error {
			if left := leftovers(); len(left) > 0 {
				return fmt.Errorf("still there: %v", left)
			}
			return nil
		})
		if !strings.Contains(k.Proc.LogTail(20000), "removed what kube-proxy left on this node") {
			t.Errorf("kpr's log does not say what it removed:\n%s", k.Proc.LogTail(3000))
		}
		if after := sh("iptables-save; nft list tables"); !strings.Contains(after, ":ADMIN - [0:0]") || !strings.Contains(after, "table inet admin") {
			t.Errorf("kpr removed the admin's rules:\n%s", after)
		}
	})

	t.Run("static pod manifest moved out and back", func(t *testing.T) {
		manifests := filepath.Join(node.NodeDir, "etc/kubernetes/manifests")
		if err := os.MkdirAll(manifests, 0o755); err != nil {
			t.Fatal(err)
		}
		manifest := "apiVersion: v1\nkind: Pod\nmetadata:\n  name: kube-proxy\n  namespace: kube-system\n  labels: {component: kube-proxy}\nspec:\n  hostNetwork: true\n  containers:\n  - name: kube-proxy\n    image: registry.k8s.io/kube-proxy:v1.36.3\n"
		if err := os.WriteFile(filepath.Join(manifests, "kube-proxy.manifest"), []byte(manifest), 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := node.Exec(ctx, 0, bin, append([]string{"kubeadm", "clean-node"}, nodeFlags...)...)
		if err != nil || !strings.Contains(string(out), "static pod manifest moved") {
			t.Fatalf("clean-node with a static kube-proxy: %v\n%s", err, out)
		}
		if _, err := os.Stat(filepath.Join(manifests, "kube-proxy.manifest")); err == nil {
			t.Error("the manifest is still where kubelet reads it")
		}
		out, err = node.Exec(ctx, 0, bin, append([]string{"kubeadm", "restore-node"}, nodeFlags[:4]...)...)
		if err != nil || !strings.Contains(string(out), "restored") {
			t.Fatalf("restore-node: %v\n%s", err, out)
		}
		if got, err := os.ReadFile(filepath.Join(manifests, "kube-proxy.manifest")); err != nil || string(got) != manifest {
			t.Errorf("after restore-node: %v, content equal: %v", err, string(got) == manifest)
		}
	})
}
