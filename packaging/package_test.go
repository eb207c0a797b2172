// Package packaging tests the .deb and .rpm that `make package` builds into dist/: what they
// hold, their metadata and scripts, lintian's verdict, and the .deb installed, upgraded,
// removed and purged in a throwaway root. `make test` builds the packages and points
// KPR_PACKAGE_DIR at them; without it the tests are skipped.
package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// pkgs finds the one .deb and the one .rpm in KPR_PACKAGE_DIR.
func pkgs(t *testing.T) (deb, rpm string) {
	t.Helper()
	dir := os.Getenv("KPR_PACKAGE_DIR")
	if dir == "" {
		t.Skip("KPR_PACKAGE_DIR is not set (make test builds the packages and sets it)")
	}
	find := func(pattern string) string {
		m, _ := filepath.Glob(filepath.Join(dir, pattern))
		if len(m) != 1 {
			t.Fatalf("want one %s in %s, found %v", pattern, dir, m)
		}
		return m[0]
	}
	return find("kpr_*.deb"), find("kpr-*.rpm")
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// The files every package installs, with their modes.
var files = map[string]string{
	"/usr/bin/kpr":                        "-rwxr-xr-x",
	"/usr/lib/systemd/system/kpr.service": "-rw-r--r--",
	"/etc/kpr/kpr.yaml":                   "-rw-r--r--",
	"/etc/default/kpr":                    "-rw-r--r--",
	"/usr/share/man/man8/kpr.8.gz":        "-rw-r--r--",
	"/usr/share/man/man8/kpr-run.8.gz":    "-rw-r--r--",
}

var configFiles = []string{"/etc/default/kpr", "/etc/kpr/kpr.yaml"}

func TestDeb(t *testing.T) {
	deb, _ := pkgs(t)
	version := strings.TrimSpace(run(t, "dpkg-deb", "-f", deb, "Version"))
	if !strings.HasPrefix(filepath.Base(deb), "kpr_"+version+"_") || !strings.HasSuffix(version, "-1") {
		t.Errorf("file %s, Version %q: want kpr_<version>-1_<arch>.deb", filepath.Base(deb), version)
	}
	for field, want := range map[string]string{"Package": "kpr", "Architecture": run(t, "dpkg", "--print-architecture"), "Depends": "init-system-helpers (>= 1.54~)", "Section": "net"} {
		if got := strings.TrimSpace(run(t, "dpkg-deb", "-f", deb, field)); got != strings.TrimSpace(want) {
			t.Errorf("%s: %q, want %q", field, got, strings.TrimSpace(want))
		}
	}
	listing := run(t, "dpkg-deb", "-c", deb)
	for path, mode := range files {
		if !hasEntry(listing, mode, "root/root", "."+path) {
			t.Errorf("dpkg-deb -c: no %s %s owned by root/root:\n%s", mode, path, listing)
		}
	}
	if got := strings.Fields(run(t, "dpkg-deb", "-I", deb, "conffiles")); strings.Join(got, " ") != strings.Join(configFiles, " ") {
		t.Errorf("conffiles %v, want %v", got, configFiles)
	}
	for _, script := range []string{"postinst", "prerm", "postrm"} {
		if body := run(t, "dpkg-deb", "-I", deb, script); !strings.Contains(body, "kpr.service") {
			t.Errorf("%s does not handle kpr.service:\n%s", script, body)
		}
	}

	// The packaged binary says what it is, and the packaged configuration is valid.
	root := t.TempDir()
	run(t, "dpkg-deb", "-x", deb, root)
	v := run(t, filepath.Join(root, "usr/bin/kpr"), "version")
	if !strings.HasPrefix(v, "kpr "+strings.TrimSuffix(version, "-1")+" (commit ") || strings.Contains(v, "unknown") {
		t.Errorf("kpr version in the package: %q; want its version, commit and build date", v)
	}
	if out := run(t, filepath.Join(root, "usr/bin/kpr"), "config", "validate", filepath.Join(root, "etc/kpr/kpr.yaml")); !strings.Contains(out, "valid") {
		t.Errorf("the packaged kpr.yaml: %s", out)
	}
}

// hasEntry: a tar listing line with this mode, owner and path.
func hasEntry(listing, mode, owner, path string) bool {
	for _, line := range strings.Split(listing, "\n") {
		f := strings.Fields(line)
		if len(f) >= 6 && f[0] == mode && f[1] == owner && f[len(f)-1] == path {
			return true
		}
	}
	return false
}

func TestRPM(t *testing.T) {
	deb, rpm := pkgs(t)
	version := strings.TrimSuffix(strings.TrimSpace(run(t, "dpkg-deb", "-f", deb, "Version")), "-1")
	nvra := run(t, "rpm", "-qp", "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}", rpm)
	f := strings.Fields(nvra)
	if len(f) != 4 || f[0] != "kpr" || f[1] != version || f[2] != "1" || filepath.Base(rpm) != "kpr-"+f[1]+"-"+f[2]+"."+f[3]+".rpm" {
		t.Errorf("rpm %s: %q; want kpr %s 1 <arch> named kpr-<version>-1.<arch>.rpm", filepath.Base(rpm), nvra, version)
	}
	// rpm -qplv: mode, links, owner, group, size, date (3 fields), path.
	entries := map[string]string{}
	for _, line := range strings.Split(run(t, "rpm", "-qplv", rpm), "\n") {
		if f := strings.Fields(line); len(f) >= 9 {
			entries[f[len(f)-1]] = f[0] + " " + f[2] + ":" + f[3]
		}
	}
	for path, mode := range files {
		if got := entries[path]; got != mode+" root:root" {
			t.Errorf("rpm -qplv: %s is %q, want %s root:root", path, got, mode)
		}
	}
	// Config files are %config(noreplace): flags "c" and "n".
	flags := map[string]string{}
	for _, line := range strings.Split(run(t, "rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", rpm), "\n") {
		if p, fl, ok := strings.Cut(line, " "); ok {
			flags[p] = fl
		}
	}
	for _, c := range configFiles {
		if !strings.Contains(flags[c], "c") || !strings.Contains(flags[c], "n") {
			t.Errorf("%s: file flags %q, want config and noreplace", c, flags[c])
		}
	}
	if fl := flags["/usr/bin/kpr"]; strings.Contains(fl, "c") {
		t.Errorf("/usr/bin/kpr is marked as a config file (%q)", fl)
	}
	scripts := run(t, "rpm", "-qp", "--scripts", rpm)
	for _, want := range []string{"postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet", "systemctl enable kpr.service", "/usr/bin/kpr cleanup", "try-restart kpr.service"} {
		if !strings.Contains(scripts, want) {
			t.Errorf("rpm scripts lack %q:\n%s", want, scripts)
		}
	}
}

// Lintian finds nothing; what it would otherwise say is overridden in
// packaging/lintian-overrides, each with its reason.
func TestLintian(t *testing.T) {
	deb, _ := pkgs(t)
	out, err := exec.Command("lintian", "--fail-on", "error,warning", "--no-tag-display-limit", deb).CombinedOutput()
	var tags []string
	for _, line := range strings.Split(string(out), "\n") {
		if len(line) > 2 && line[1] == ':' && strings.ContainsRune("EWI", rune(line[0])) {
			tags = append(tags, line)
		}
	}
	if err != nil || len(tags) > 0 {
		t.Fatalf("lintian %s: %v\n%s", filepath.Base(deb), err, strings.Join(tags, "\n"))
	}
}

// dpkgRoot is an empty dpkg database in a throwaway root. The maintainer scripts run on this
// machine with DPKG_ROOT set (--force-script-chrootless), as for an image build: they must
// change files under the root only, and never this machine's systemd or datapath.
type dpkgRoot struct {
	t    *testing.T
	root string
}

func newDpkgRoot(t *testing.T) *dpkgRoot {
	r := &dpkgRoot{t, t.TempDir()}
	for _, d := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates"} {
		if err := os.MkdirAll(filepath.Join(r.root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"var/lib/dpkg/status", "var/lib/dpkg/available"} {
		if err := os.WriteFile(filepath.Join(r.root, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return r
}

func (r *dpkgRoot) dpkg(args ...string) string {
	r.t.Helper()
	// init-system-helpers is this machine's, not the root's: its dependency is forced.
	return run(r.t, "dpkg", append([]string{"--root=" + r.root, "--force-script-chrootless", "--force-depends", "--log=/dev/null"}, args...)...)
}

func (r *dpkgRoot) path(p string) string { return filepath.Join(r.root, p) }

func (r *dpkgRoot) exists(p string) bool {
	_, err := os.Lstat(r.path(p))
	return err == nil
}

const wantsLink = "/etc/systemd/system/multi-user.target.wants/kpr.service"

func TestDebInstallUpgradeRemovePurge(t *testing.T) {
	deb, _ := pkgs(t)
	hostLink := wantsLink
	_, hostHadLink := os.Lstat(hostLink)
	r := newDpkgRoot(t)

	r.dpkg("-i", deb)
	for path, mode := range files {
		st, err := os.Stat(r.path(path))
		if err != nil || st.Mode().String() != mode {
			t.Errorf("%s after install: %v %v, want %s", path, st.Mode(), err, mode)
		}
	}
	if target, err := os.Readlink(r.path(wantsLink)); err != nil || target != "/usr/lib/systemd/system/kpr.service" {
		t.Errorf("kpr.service not enabled in the root: %q %v", target, err)
	}

	// An upgrade (here the same version again) keeps the admin's configuration and the unit
	// enabled.
	edited := "nodeName: node-7\n"
	if err := os.WriteFile(r.path("/etc/kpr/kpr.yaml"), []byte(edited), 0o644); err != nil {
		t.Fatal(err)
	}
	r.dpkg("--force-confold", "-i", deb)
	if got, _ := os.ReadFile(r.path("/etc/kpr/kpr.yaml")); string(got) != edited {
		t.Errorf("the admin's kpr.yaml after an upgrade: %q, want %q", got, edited)
	}
	if !r.exists(wantsLink) {
		t.Error("kpr.service no longer enabled after an upgrade")
	}

	// Removal: the unit is disabled, the configuration stays, and the binary and settings
	// are kept for the purge's cleanup.
	r.dpkg("-r", "kpr")
	if r.exists(wantsLink) || r.exists("/usr/bin/kpr") {
		t.Errorf("after removal: enabled %v, binary %v; want neither", r.exists(wantsLink), r.exists("/usr/bin/kpr"))
	}
	for _, p := range []string{"/etc/kpr/kpr.yaml", "/etc/default/kpr", "/var/lib/kpr/purge/kpr", "/var/lib/kpr/purge/kpr.yaml", "/var/lib/kpr/purge/kpr.default"} {
		if !r.exists(p) {
			t.Errorf("after removal %s is gone", p)
		}
	}

	// Purge: everything of kpr's goes.
	r.dpkg("-P", "kpr")
	for _, p := range []string{"/etc/kpr/kpr.yaml", "/etc/default/kpr", "/var/lib/kpr", "/usr/lib/systemd/system/kpr.service", wantsLink} {
		if r.exists(p) {
			t.Errorf("after purge %s is still there", p)
		}
	}
	if _, err := os.Lstat(hostLink); (err == nil) != (hostHadLink == nil) {
		t.Errorf("the scripts changed this machine's %s", hostLink)
	}
}

// The unit in the package passes systemd-analyze verify. This machine has no /usr/bin/kpr, so
// ExecStart is pointed at the package's binary, unpacked; the manual page the unit names is
// checked by TestDeb's file list instead (--man=no).
func TestUnitVerifies(t *testing.T) {
	deb, _ := pkgs(t)
	root := t.TempDir()
	run(t, "dpkg-deb", "-x", deb, root)
	unit, err := os.ReadFile(filepath.Join(root, "usr/lib/systemd/system/kpr.service"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=always", "Before=kubelet.service",
		"After=network-online.target", "LimitMEMLOCK=infinity", "ProtectSystem=strict", "ProtectHome=yes",
		"StateDirectory=kpr", "RuntimeDirectory=kpr", "EnvironmentFile=-/etc/default/kpr",
		"CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_SYS_ADMIN CAP_PERFMON CAP_SYS_RESOURCE"} {
		if !strings.Contains(string(unit), "\n"+want) {
			t.Errorf("kpr.service lacks %q", want)
		}
	}
	// Every capability the unit keeps is justified in a comment above it.
	for _, c := range []string{"CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_PERFMON", "CAP_SYS_RESOURCE"} {
		if !strings.Contains(string(unit), "# "+c+": ") {
			t.Errorf("kpr.service keeps %s without saying why", c)
		}
	}
	local := filepath.Join(root, "kpr.service")
	patched := strings.Replace(string(unit), "ExecStart=/usr/bin/kpr", "ExecStart="+filepath.Join(root, "usr/bin/kpr"), 1)
	if err := os.WriteFile(local, []byte(patched), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, "systemd-analyze", "verify", "--man=no", local)
}
