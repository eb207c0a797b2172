// Package kubeproxy removes what kube-proxy leaves in a node's kernel when its pod goes away
// (it does not clean up on exit): its iptables chains, its nftables tables, and in IPVS mode its
// virtual servers and the kube-ipvs0 device. It is what `kube-proxy --cleanup` does, for nodes
// where the kube-proxy binary lived only in its container image.
package kubeproxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"

	"github.com/google/nftables"
)

// kubeletChains are KUBE-* chains that kubelet, not kube-proxy, owns; they stay (kube-proxy's
// own cleanup leaves them too).
var kubeletChains = []string{"KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"}

// Report says what Clean removed and what it could not look at.
type Report struct {
	Removed []string
	Skipped []string
}

// Clean removes kube-proxy's leftovers from the calling thread's network namespace. It never
// touches another table or chain, and finding nothing is not an error.
func Clean(ctx context.Context) (Report, error) {
	var r Report
	var errs []error
	if err := cleanNFTables(&r); err != nil {
		errs = append(errs, err)
	}
	for _, ipt := range iptablesBackends(&r) {
		if err := cleanIPTables(ctx, ipt, &r); err != nil {
			errs = append(errs, err)
		}
	}
	if err := cleanIPVS(ctx, &r); err != nil {
		errs = append(errs, err)
	}
	return r, errors.Join(errs...)
}

// cleanNFTables deletes kube-proxy's nftables mode tables, "ip kube-proxy" and "ip6 kube-proxy".
func cleanNFTables(r *Report) error {
	conn, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	defer conn.CloseLasting()
	tables, err := conn.ListTables()
	if err != nil {
		return fmt.Errorf("listing nftables tables: %w", err)
	}
	var gone []string
	for _, t := range tables {
		if t.Name != "kube-proxy" || (t.Family != nftables.TableFamilyIPv4 && t.Family != nftables.TableFamilyIPv6) {
			continue
		}
		conn.DelTable(t)
		fam := "ip"
		if t.Family == nftables.TableFamilyIPv6 {
			fam = "ip6"
		}
		gone = append(gone, "nftables table "+fam+" kube-proxy")
	}
	if len(gone) == 0 {
		return nil
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("deleting kube-proxy's nftables tables: %w", err)
	}
	r.Removed = append(r.Removed, gone...)
	return nil
}

// iptables is one family and backend of the iptables tools.
type iptables struct {
	name          string // for messages: "iptables (nf_tables)"
	save, restore string
}

// iptablesBackends are the iptables tools to clean with: the nf_tables backend where kernel
// nftables holds xtables tables, and the legacy one where the kernel's x_tables has tables in
// this namespace (/proc/net/ip_tables_names), so that looking never loads a module or makes a
// table.
func iptablesBackends(r *Report) []iptables {
	var out []iptables
	for _, fam := range []struct{ cmd, legacyNames string }{{"iptables", "/proc/net/ip_tables_names"}, {"ip6tables", "/proc/net/ip6_tables_names"}} {
		// Older tools have no -nft suffix; on current systems they are the nf_tables ones.
		if tool, ok := firstTool(fam.cmd+"-nft", fam.cmd); ok {
			out = append(out, iptables{name: fam.cmd + " (nf_tables)", save: tool + "-save", restore: tool + "-restore"})
		} else {
			r.Skipped = append(r.Skipped, fam.cmd+": no "+fam.cmd+"-save on this node, so kube-proxy's "+fam.cmd+" rules (if any) were not looked at")
		}
		names, err := os.ReadFile(fam.legacyNames)
		if tool, ok := firstTool(fam.cmd + "-legacy"); ok && err == nil && len(bytes.TrimSpace(names)) > 0 {
			out = append(out, iptables{name: fam.cmd + " (legacy)", save: tool + "-save", restore: tool + "-restore"})
		}
	}
	return out
}

// firstTool is the first of the iptables tools named (without -save/-restore) that is
// installed.
func firstTool(names ...string) (string, bool) {
	for _, n := range names {
		if _, err := exec.LookPath(n + "-save"); err == nil {
			return n, true
		}
	}
	return "", false
}

// cleanIPTables unlinks and deletes kube-proxy's KUBE-* chains in each table, in one
// iptables-restore --noflush per table, as kube-proxy's cleanup does.
func cleanIPTables(ctx context.Context, ipt iptables, r *Report) error {
	var errs []error
	for _, table := range []string{"filter", "nat", "mangle", "raw"} {
		out, err := exec.CommandContext(ctx, ipt.save, "-t", table).Output()
		if err != nil {
			continue // the table does not exist here
		}
		script, chains := cleanupScript(table, out)
		if len(chains) == 0 {
			continue
		}
		cmd := exec.CommandContext(ctx, ipt.restore, "--noflush")
		cmd.Stdin = bytes.NewReader(script)
		if msg, err := cmd.CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("%s, table %s: %s --noflush: %w: %s", ipt.name, table, ipt.restore, err, strings.TrimSpace(string(msg))))
			continue
		}
		r.Removed = append(r.Removed, fmt.Sprintf("%s table %s: %d kube-proxy chains", ipt.name, table, len(chains)))
	}
	return errors.Join(errs...)
}

// cleanupScript is the iptables-restore input that removes kube-proxy's chains from one table
// given iptables-save's output for it: every KUBE-* chain but kubelet's is flushed, every rule
// of another chain that jumps or goes to one is deleted, then the chains are deleted. It
// returns the chains it removes.
func cleanupScript(table string, saved []byte) ([]byte, []string) {
	var chains, unlink []string
	owned := func(c string) bool { return strings.HasPrefix(c, "KUBE-") && !slices.Contains(kubeletChains, c) }
	sc := bufio.NewScanner(bytes.NewReader(saved))
	sc.Buffer(make([]byte, 0, 64*1024), 16*1024*1024)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, ":"):
			if name, _, _ := strings.Cut(line[1:], " "); owned(name) {
				chains = append(chains, name)
			}
		case strings.HasPrefix(line, "-A "):
			f := strings.Fields(line)
			if len(f) < 2 || owned(f[1]) {
				continue // flushed with its chain
			}
			for i := 2; i+1 < len(f); i++ {
				if (f[i] == "-j" || f[i] == "-g" || f[i] == "--jump" || f[i] == "--goto") && owned(f[i+1]) {
					unlink = append(unlink, "-D"+line[2:])
					break
				}
			}
		}
	}
	if len(chains) == 0 && len(unlink) == 0 {
		return nil, nil
	}
	var b bytes.Buffer
	b.WriteString("*" + table + "\n")
	for _, c := range chains {
		b.WriteString(":" + c + " - [0:0]\n") // with --noflush: flushes the chain
	}
	for _, u := range unlink {
		b.WriteString(u + "\n")
	}
	for _, c := range chains {
		b.WriteString("-X " + c + "\n")
	}
	b.WriteString("COMMIT\n")
	return b.Bytes(), chains
}

// cleanIPVS removes IPVS mode's kube-ipvs0 device and, with ipvsadm installed, its virtual
// servers.
func cleanIPVS(ctx context.Context, r *Report) error {
	var errs []error
	if _, err := os.Stat("/proc/net/ip_vs"); err == nil {
		if _, err := exec.LookPath("ipvsadm"); err != nil {
			r.Skipped = append(r.Skipped, "IPVS: ipvsadm is not installed, so IPVS virtual servers (if any) were not removed")
		} else if out, err := exec.CommandContext(ctx, "ipvsadm", "-Sn").Output(); err == nil && len(bytes.TrimSpace(out)) > 0 {
			if msg, err := exec.CommandContext(ctx, "ipvsadm", "-C").CombinedOutput(); err != nil {
				errs = append(errs, fmt.Errorf("ipvsadm -C: %w: %s", err, msg))
			} else {
				r.Removed = append(r.Removed, "IPVS virtual servers")
			}
		}
	}
	// ip(8) asks this namespace; /sys/class/net may be another namespace's sysfs.
	if exec.CommandContext(ctx, "ip", "-o", "link", "show", "dev", "kube-ipvs0").Run() == nil {
		if msg, err := exec.CommandContext(ctx, "ip", "link", "del", "kube-ipvs0").CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip link del kube-ipvs0: %w: %s", err, msg))
		} else {
			r.Removed = append(r.Removed, "device kube-ipvs0")
		}
	}
	return errors.Join(errs...)
}
