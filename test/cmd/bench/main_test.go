package main

import (
	"os"
	"path/filepath"
	"testing"
)

func TestUpdateReadme(t *testing.T) {
	path := filepath.Join(t.TempDir(), "README.md")
	before := "# kpr\n\n## Try it\n\nmake demo\n\n## Performance\n\nNot measured yet.\n\n## Layout\n\ncmd/kpr\n"
	if err := os.WriteFile(path, []byte(before), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := updateReadme(path, "## Performance\n\nFigures.\n"); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(path)
	want := "# kpr\n\n## Try it\n\nmake demo\n\n## Performance\n\nFigures.\n\n## Layout\n\ncmd/kpr\n"
	if string(got) != want {
		t.Fatalf("got:\n%s\nwant:\n%s", got, want)
	}
	if err := os.WriteFile(path, []byte("# kpr\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := updateReadme(path, "## Performance\n"); err == nil {
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
