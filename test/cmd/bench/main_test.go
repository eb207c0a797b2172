package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/kpr-dev/kpr/test/bench"
)

func TestUpdateReadme(t *testing.T) {
	path := filepath.Join(t.TempDir(), "README.md")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	update := func(sc bench.Scenario, block, want string) {
		t.Helper()
		if err := updateReadme(path, sc, block); err != nil {
			t.Fatal(err)
		}
		got, _ := os.ReadFile(path)
		if string(got) != want {
			t.Fatalf("got:\n%s\nwant:\n%s", got, want)
		}
	}
	write("# kpr\n\n## Try it\n\nmake demo\n\n## Performance\n\nIntro.\n\n## Layout\n\ncmd/kpr\n")
	// No markers yet: the block goes to the end of the section.
	update(bench.ClusterIP, "### ClusterIP\n\nFigures.\n",
		"# kpr\n\n## Try it\n\nmake demo\n\n## Performance\n\nIntro.\n\n<!-- bench:clusterip -->\n### ClusterIP\n\nFigures.\n<!-- /bench:clusterip -->\n\n## Layout\n\ncmd/kpr\n")
	update(bench.NodePort, "### NodePort\n",
		"# kpr\n\n## Try it\n\nmake demo\n\n## Performance\n\nIntro.\n\n<!-- bench:clusterip -->\n### ClusterIP\n\nFigures.\n<!-- /bench:clusterip -->\n\n"+
			"<!-- bench:nodeport -->\n### NodePort\n<!-- /bench:nodeport -->\n\n## Layout\n\ncmd/kpr\n")
	// Markers present: only what they hold changes.
	update(bench.ClusterIP, "### ClusterIP\n\nNew figures.\n",
		"# kpr\n\n## Try it\n\nmake demo\n\n## Performance\n\nIntro.\n\n<!-- bench:clusterip -->\n### ClusterIP\n\nNew figures.\n<!-- /bench:clusterip -->\n\n"+
			"<!-- bench:nodeport -->\n### NodePort\n<!-- /bench:nodeport -->\n\n## Layout\n\ncmd/kpr\n")

	write("# kpr\n\n## Performance\n\n<!-- bench:nodeport -->\nhalf\n")
	if err := updateReadme(path, bench.NodePort, "x"); err == nil {
		t.Fatal("an opening marker without its end: want an error")
	}
	write("# kpr\n")
	if err := updateReadme(path, bench.ClusterIP, "x"); err == nil {
		t.Fatal("no Performance section: want an error")
	}
}

func TestParseInts(t *testing.T) {
	got, err := parseInts("1, 10_000")
	if err != nil || len(got) != 2 || got[0] != 1 || got[1] != 10000 {
		t.Fatalf("parseInts = %v, %v", got, err)
	}
	if _, err := parseInts("1,x"); err == nil {
		t.Fatal("want an error for x")
	}
}
