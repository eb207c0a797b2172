// Command kpr is the eBPF kube-proxy replacement: `kpr run` is the node agent (started by
// systemd); the other subcommands inspect or remove what it programmed.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
	"github.com/spf13/pflag"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kpr-dev/kpr/bpf"
	"github.com/kpr-dev/kpr/kubeadm"
	"github.com/kpr-dev/kpr/node/agent"
	"github.com/kpr-dev/kpr/node/config"
	"github.com/kpr-dev/kpr/node/datapath"
	"github.com/kpr-dev/kpr/node/kubeproxy"
	"github.com/kpr-dev/kpr/node/lbstate"
)

func main() {
	if err := newRoot(os.Stdout).Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "kpr:", err)
		os.Exit(1)
	}
}

func newRoot(out io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "kpr",
		Short:         "kpr replaces kube-proxy with an eBPF datapath",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(out)
	root.AddCommand(runCmd(), statusCmd(out), serviceCmd(out), cleanupCmd(out), configCmd(out), kubeadmCmd(out), versionCmd(out), manCmd(root))
	return root
}

func runCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "run",
		Short: "run the node agent (normally started by systemd as kpr.service)",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			cfg, err := config.Load(c.Flags())
			if err != nil {
				return err
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, nil))
			if os.Getenv("GOGC") == "" {
				// The agent is mostly idle and its live heap is the informer caches: trade a
				// little CPU at sync time for a lower peak (see docs/bench). GOGC overrides.
				debug.SetGCPercent(30)
			}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			a := agent.New(cfg, log)
			// SIGHUP (systemctl reload kpr): a full sync now.
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			go func() {
				for {
					select {
					case <-ctx.Done():
						return
					case <-hup:
						log.Info("SIGHUP: full sync requested")
						a.RequestFullSync()
					}
				}
			}()
			return a.Run(ctx)
		},
	}
	config.AddFlags(c.Flags())
	return c
}

func statusCmd(out io.Writer) *cobra.Command {
	c := &cobra.Command{
		Use:   "status",
		Short: "show the agent's state in a few lines",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			cfg, err := config.Load(c.Flags())
			if err != nil {
				return err
			}
			return printStatus(out, cfg)
		},
	}
	config.AddFlags(c.Flags())
	return c
}

func printStatus(out io.Writer, cfg *config.Config) error {
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	defer w.Flush()
	st, err := agent.ReadStatus(cfg.RunDir)
	switch {
	case err != nil:
		fmt.Fprintf(w, "Agent:\tno status in %s (%v)\n", cfg.RunDir, err)
	default:
		state := "running"
		if !st.Stopped.IsZero() {
			state = "stopped at " + st.Stopped.Format(time.RFC3339)
		} else if syscall.Kill(st.PID, 0) != nil {
			state = "not running (last pid " + fmt.Sprint(st.PID) + ")"
		}
		fmt.Fprintf(w, "Agent:\t%s, version %s, pid %d, node %q\n", state, st.Version, st.PID, st.Node)
		fmt.Fprintf(w, "API server:\t%s (%s)\n", st.API, strings.Join(st.APIServers, ", "))
		sync := "not yet synced"
		if st.Synced {
			sync = fmt.Sprintf("last sync %s ago, took %s", time.Since(st.LastSync).Round(time.Second), st.LastSyncDuration)
			if !st.LastFullSync.IsZero() {
				sync += fmt.Sprintf("; last full sync %s ago", time.Since(st.LastFullSync).Round(time.Second))
			}
		}
		if st.LastSyncError != "" {
			sync += ", error: " + st.LastSyncError
		}
		fmt.Fprintf(w, "Sync:\t%s\n", sync)
		if st.Networking != nil {
			fmt.Fprintf(w, "Networking:\t%s\n", networkingLine(st.Networking))
		}
		if st.NorthSouth != "" {
			fmt.Fprintf(w, "From outside:\t%s\n", st.NorthSouth)
		}
		if st.KubeProxy != "" {
			fmt.Fprintf(w, "WARNING:\t%s\n", st.KubeProxy)
		}
		if st.Masquerade != "" {
			fmt.Fprintf(w, "Masquerade:\t%s\n", st.Masquerade)
		}
		if st.HealthCheckPorts > 0 || st.HealthCheckError != "" {
			hc := fmt.Sprintf("%d healthCheckNodePorts served", st.HealthCheckPorts)
			if st.HealthCheckError != "" {
				hc += "; " + st.HealthCheckError
			}
			fmt.Fprintf(w, "Health checks:\t%s\n", hc)
		}
		if st.Error != "" {
			fmt.Fprintf(w, "Error:\t%s\n", st.Error)
		}
	}
	links, err := bpf.Attached(cfg.BPFPinDir)
	if err != nil {
		fmt.Fprintf(w, "Datapath:\tnot loaded (%v)\n", err)
		return nil
	}
	cgroup := ""
	if st != nil {
		cgroup = " to " + st.Cgroup
	}
	fmt.Fprintf(w, "Datapath:\t%d programs attached%s, pinned in %s (%s)\n", len(links), cgroup, cfg.BPFPinDir, strings.Join(links, " "))
	m, err := bpf.OpenMaps(cfg.BPFPinDir)
	if err != nil {
		fmt.Fprintf(w, "Maps:\t%v\n", err)
		return nil
	}
	defer m.Close()
	svcs, err1 := m.Services()
	bes, err2 := m.Backends()
	cidrs, err3 := m.ServiceCIDRs()
	if err := errors.Join(err1, err2, err3); err != nil {
		fmt.Fprintf(w, "Maps:\t%v\n", err)
		return nil
	}
	n := 0
	for k := range svcs {
		if !datapath.IsWildcard(k) {
			n++
		}
	}
	unalloc := "unallocated ClusterIPs not refused (no Service CIDRs)"
	if len(cidrs) > 0 {
		unalloc = "unallocated addresses in " + joinPrefixes(cidrs) + " refused"
	}
	fmt.Fprintf(w, "Load balancing:\t%d frontends, %d backends; %s\n", n, len(bes), unalloc)
	if taken, slots, err := m.SocketSlots(); err != nil {
		fmt.Fprintf(w, "Socket slots:\t%v\n", err)
	} else {
		fmt.Fprintf(w, "Socket slots:\t%d of %d in use by sockets connected to a Service (a socket whose slot is in use keeps its reverse translation in the LRU map or in socket storage)\n", taken, slots)
	}
	if nm, err := bpf.OpenNodePortMaps(cfg.BPFPinDir); err == nil {
		st, err := nm.Stats()
		nm.Close()
		if err == nil {
			fmt.Fprintf(w, "Outside traffic:\t%s\n", northSouthCounters(st))
		}
	}
	return nil
}

// northSouthCounters is the tc programs' counters since the maps were created, on one line:
// what was served, made up by the node, and dropped, and why.
func northSouthCounters(s bpf.NodePortStats) string {
	out := fmt.Sprintf("%d flows, %d packets forwarded, %d replies", s.NewFlows, s.Forwarded, s.Replies)
	if s.XDPTx > 0 {
		out += fmt.Sprintf(" (%d of these by XDP)", s.XDPTx)
	}
	out += fmt.Sprintf("; answered: %d refusals, %d pings, %d too big, %d TTL exceeded, %d ICMP errors passed on",
		s.Rejected, s.EchoReplies, s.TooBig, s.TTLExceeded, s.ICMPErrors)
	if s.DSRLearned > 0 {
		out += fmt.Sprintf("; %d DSR packets from other nodes told where replies go", s.DSRLearned)
	}
	var drops []string
	for _, d := range []struct {
		n    uint64
		what string
	}{
		{s.DropNoBackend, "no usable backend"},
		{s.DropNotServed, "port not served"},
		{s.DropSourceRange, "outside loadBalancerSourceRanges"},
		{s.RateLimited, "over the answer rate limit"},
		{s.DropNoSNATPort, "no free SNAT port"},
		{s.DropNoNodeAddr, "no SNAT address"},
		{s.DropTTL, "TTL exhausted"},
		{s.DropDSRNoRoom, "no room for the DSR option"},
		{s.DropError, "errors"},
	} {
		if d.n > 0 {
			drops = append(drops, fmt.Sprintf("%d %s", d.n, d.what))
		}
	}
	if len(drops) > 0 {
		out += "; dropped: " + strings.Join(drops, ", ")
	}
	return out
}

// networkingLine is the agent's cluster networking on one line, each value with its source.
// An unknown value's source already says why ("none: ...", "unknown: ...").
func networkingLine(n *agent.Networking) string {
	list := func(what string, vals []string, from string) string {
		if len(vals) == 0 {
			return what + " " + from
		}
		return fmt.Sprintf("%s %s (%s)", what, strings.Join(vals, ","), from)
	}
	dns := "DNS domain " + n.DNSDomainFrom
	if n.DNSDomain != "" {
		dns = fmt.Sprintf("DNS domain %s (%s)", n.DNSDomain, n.DNSDomainFrom)
	}
	return strings.Join([]string{
		list("service CIDRs", n.ServiceCIDRs, n.ServiceCIDRsFrom),
		list("pod CIDRs", n.PodCIDRs, n.PodCIDRsFrom),
		dns,
	}, "; ")
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func serviceCmd(out io.Writer) *cobra.Command {
	svc := &cobra.Command{Use: "service", Short: "inspect programmed Services"}
	list := &cobra.Command{
		Use:   "list",
		Short: "list the frontends and backends programmed in the datapath (from the pinned maps)",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			cfg, err := config.Load(c.Flags())
			if err != nil {
				return err
			}
			m, err := bpf.OpenMaps(cfg.BPFPinDir)
			if err != nil {
				return err
			}
			defer m.Close()
			return listServices(out, m)
		},
	}
	config.AddFlags(list.Flags())
	svc.AddCommand(list)
	return svc
}

func listServices(out io.Writer, m datapath.LBMap) error {
	svcs, err := m.Services()
	if err != nil {
		return err
	}
	bes, err := m.Backends()
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(out, 0, 4, 3, ' ', 0)
	defer w.Flush()
	fmt.Fprintln(w, "ID\tFrontend\tType\tScope\tBackends")
	for _, k := range datapath.SortedKeys(svcs) {
		if datapath.IsWildcard(k) {
			continue
		}
		s := svcs[k]
		scope := "socket"
		if k.Scope == bpf.ScopeExternal {
			scope = "external"
			if s.Flags&bpf.FlagDSR != 0 {
				scope = "external, DSR"
			}
		}
		fe := fmt.Sprintf("%s/%s", netip.AddrPortFrom(k.Addr, k.Port), datapath.ProtoName(k.Proto))
		typ := lbstate.Type(s.Flags.Type()).String()
		if len(s.Backends) == 0 {
			why := "none: refused (no endpoints)"
			if s.Flags&bpf.FlagUnreachable != 0 {
				why = "none: unreachable (no local endpoints)"
			}
			fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\n", s.ID, fe, typ, scope, why)
			continue
		}
		type line struct {
			addr netip.AddrPort
			text string
		}
		lines := make([]line, 0, len(s.Backends))
		for _, id := range s.Backends {
			b, ok := bes[id]
			if !ok {
				lines = append(lines, line{text: fmt.Sprintf("%d => (missing)", id)})
				continue
			}
			ap := netip.AddrPortFrom(b.Addr, b.Port)
			lines = append(lines, line{ap, fmt.Sprintf("%d => %s/%s", id, ap, datapath.ProtoName(b.Proto))})
		}
		slices.SortFunc(lines, func(a, b line) int { return a.addr.Compare(b.addr) })
		for i, l := range lines {
			if i == 0 {
				fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\n", s.ID, fe, typ, scope, l.text)
			} else {
				fmt.Fprintf(w, "\t\t\t\t%s\n", l.text)
			}
		}
	}
	return nil
}

func cleanupCmd(out io.Writer) *cobra.Command {
	c := &cobra.Command{
		Use:   "cleanup",
		Short: "detach and remove everything kpr programmed (pinned maps and links, tc attachments, the nftables table)",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			cfg, err := config.Load(c.Flags())
			if err != nil {
				return err
			}
			if err := bpf.Cleanup(cfg.BPFPinDir); err != nil {
				return err
			}
			if err := agent.DeleteMasquerade(); err != nil {
				return fmt.Errorf("deleting the nftables table %q: %w", "kpr", err)
			}
			if err := os.Remove(filepath.Join(cfg.RunDir, agent.StatusFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			fmt.Fprintf(out, "removed the datapath pinned in %s\n", cfg.BPFPinDir)
			return nil
		},
	}
	config.AddFlags(c.Flags())
	return c
}

func configCmd(out io.Writer) *cobra.Command {
	c := &cobra.Command{Use: "config", Short: "print the documented default configuration, or check a configuration file"}
	c.AddCommand(&cobra.Command{
		Use:   "defaults",
		Short: "print a configuration file with every key, what it does and its default, commented out (what packages install as " + config.DefaultFile + ")",
		Args:  cobra.NoArgs,
		Run:   func(*cobra.Command, []string) { fmt.Fprint(out, config.DefaultFileText()) },
	})
	c.AddCommand(&cobra.Command{
		Use:   "import-kube-proxy FILE",
		Short: "convert kube-proxy's configuration (a KubeProxyConfiguration, or kubeadm's kube-proxy ConfigMap) into kpr settings on stdout; what has no equivalent is listed on stderr",
		Args:  cobra.ExactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			data, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			im, err := config.ImportKubeProxy(data)
			if err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			fmt.Fprint(out, im.YAML(args[0]))
			if len(im.Unmatched) > 0 {
				fmt.Fprintf(c.ErrOrStderr(), "kube-proxy settings in %s without an equivalent in kpr:\n", args[0])
				for _, u := range im.Unmatched {
					fmt.Fprintf(c.ErrOrStderr(), "  - %s\n", u)
				}
			}
			return nil
		},
	})
	c.AddCommand(&cobra.Command{
		Use:   "validate [FILE]",
		Short: "check a configuration file (default " + config.DefaultFile + ") with the KPR_* environment, as kpr run would; every problem at once, each naming its key",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			file := config.DefaultFile
			if len(args) == 1 {
				file = args[0]
			}
			fs := pflag.NewFlagSet("validate", pflag.ContinueOnError)
			config.AddFlags(fs)
			if err := fs.Parse([]string{"--config", file}); err != nil {
				return err
			}
			if _, err := config.Load(fs); err != nil {
				return fmt.Errorf("%s is not valid:\n%w", file, err)
			}
			fmt.Fprintf(out, "%s: valid\n", file)
			return nil
		},
	})
	return c
}

func kubeadmCmd(out io.Writer) *cobra.Command {
	c := &cobra.Command{Use: "kubeadm", Short: "fit kpr into kubeadm's flow: a cluster without kube-proxy"}
	var write bool
	initConfig := &cobra.Command{
		Use:   "init-config [FILE]",
		Short: "print a kubeadm config for `kubeadm init` without kube-proxy, or FILE changed so (v1beta4: proxy.disabled: true; v1beta3: skipPhases: [addon/kube-proxy]); -w writes FILE in place",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			if len(args) == 0 {
				if write {
					return errors.New("-w needs a FILE to write")
				}
				fmt.Fprint(out, kubeadm.DefaultInitConfig)
				return nil
			}
			in, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			data, changes, err := kubeadm.SkipKubeProxy(args[0], in)
			if err != nil {
				return err
			}
			for _, ch := range changes {
				fmt.Fprintln(c.ErrOrStderr(), "changed:", ch)
			}
			if len(changes) == 0 {
				fmt.Fprintf(c.ErrOrStderr(), "%s already keeps kubeadm init from installing kube-proxy\n", args[0])
			}
			if !write {
				_, err := out.Write(data)
				return err
			}
			if len(changes) == 0 {
				return nil
			}
			st, err := os.Stat(args[0])
			if err != nil {
				return err
			}
			return os.WriteFile(args[0], data, st.Mode().Perm())
		},
	}
	initConfig.Flags().BoolVarP(&write, "write", "w", false, "write the change into FILE instead of printing it")
	c.AddCommand(initConfig)

	var static kubeproxy.StaticPods
	cleanNode := &cobra.Command{
		Use:   "clean-node",
		Short: "on each node, once kube-proxy's DaemonSet is gone: move a kube-proxy static pod manifest to the backup directory and wait for kubelet to stop it, then remove what kube-proxy left in the kernel (its iptables chains, its nftables tables, IPVS servers and kube-ipvs0); kubelet's chains and everything else stay",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			moved, err := static.Remove(c.Context())
			for _, m := range moved {
				fmt.Fprintln(out, "static pod manifest moved:", m)
			}
			if err != nil {
				return err
			}
			r, err := kubeproxy.Clean(c.Context())
			for _, x := range r.Removed {
				fmt.Fprintln(out, "removed:", x)
			}
			for _, x := range r.Skipped {
				fmt.Fprintln(out, "not checked:", x)
			}
			if err == nil && len(r.Removed) == 0 && len(moved) == 0 {
				fmt.Fprintln(out, "nothing of kube-proxy's found")
			}
			return err
		},
	}
	restoreNode := &cobra.Command{
		Use:   "restore-node",
		Short: "on a node that clean-node took a static kube-proxy from: move its manifest back, so kubelet runs it again",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			back, err := static.Restore()
			for _, b := range back {
				fmt.Fprintln(out, "static pod manifest restored:", b)
			}
			if err == nil && len(back) == 0 {
				fmt.Fprintf(out, "no kube-proxy manifest in %s\n", static.BackupDir)
			}
			return err
		},
	}
	for _, cmd := range []*cobra.Command{cleanNode, restoreNode} {
		cmd.Flags().StringVar(&static.ManifestsDir, "manifests-dir", "/etc/kubernetes/manifests", "kubelet's static pod directory")
		cmd.Flags().StringVar(&static.BackupDir, "backup-dir", filepath.Join(kubeadm.DefaultBackupDir, "static-pods"), "where a kube-proxy static pod manifest is kept")
		c.AddCommand(cmd)
	}
	cleanNode.Flags().DurationVar(&static.Wait, "wait", 2*time.Minute, "how long kubelet may take to stop a static kube-proxy")

	// The steps on a control-plane node, with the admin kubeconfig.
	var adminConf, backupDir string
	for _, step := range []struct {
		use, short string
		fn         func(context.Context, kubernetes.Interface, string) ([]string, error)
		backups    bool // takes --backup-dir
	}{
		{"setup", "on a control-plane node: create the RBAC kpr needs in place of kube-proxy's addon (ClusterRole system:node-proxier for the group system:nodes, so kpr works with each node's kubelet credentials); idempotent",
			func(ctx context.Context, c kubernetes.Interface, _ string) ([]string, error) {
				return kubeadm.Setup(ctx, c)
			}, false},
		{"migrate", "on a control-plane node: take the cluster off kube-proxy: kpr kubeadm setup, then save the kube-proxy DaemonSet and ConfigMap to the backup directory and delete them, and set proxy.disabled in kubeadm-config so kubeadm upgrade does not reinstall it", kubeadm.Migrate, true},
		{"rollback", "on the control-plane node that migrated: restore kube-proxy (its ConfigMap and DaemonSet, and kubeadm-config) from the backup directory", kubeadm.Rollback, true},
	} {
		cmd := &cobra.Command{
			Use:   step.use,
			Short: step.short,
			Args:  cobra.NoArgs,
			RunE: func(c *cobra.Command, _ []string) error {
				cfg, err := clientcmd.BuildConfigFromFlags("", adminConf)
				if err != nil {
					return fmt.Errorf("admin kubeconfig %s: %w", adminConf, err)
				}
				client, err := kubernetes.NewForConfig(cfg)
				if err != nil {
					return err
				}
				ctx, cancel := context.WithTimeout(c.Context(), time.Minute)
				defer cancel()
				done, err := step.fn(ctx, client, backupDir)
				for _, d := range done {
					fmt.Fprintln(out, d)
				}
				return err
			},
		}
		cmd.Flags().StringVar(&adminConf, "kubeconfig", "/etc/kubernetes/admin.conf", "kubeconfig with cluster-admin rights (kubeadm's admin.conf)")
		if step.backups {
			cmd.Flags().StringVar(&backupDir, "backup-dir", kubeadm.DefaultBackupDir, "where migrate saves what it removes and rollback finds it")
		}
		c.AddCommand(cmd)
	}
	return c
}

// manCmd writes the manual pages that packages install (kpr.8 and one per subcommand); hidden,
// since it is for building packages.
func manCmd(root *cobra.Command) *cobra.Command {
	return &cobra.Command{
		Use:    "man DIR",
		Short:  "write kpr's manual pages into DIR",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			root.DisableAutoGenTag = true
			return doc.GenManTree(root, &doc.GenManHeader{Title: "KPR", Section: "8", Source: "kpr " + agent.Version, Manual: "kpr"}, args[0])
		},
	}
}

func versionCmd(out io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "print kpr's version",
		Args:  cobra.NoArgs,
		Run: func(*cobra.Command, []string) {
			fmt.Fprintf(out, "kpr %s (commit %s, built %s)\n", agent.Version, agent.Commit, agent.BuildDate)
		},
	}
}
