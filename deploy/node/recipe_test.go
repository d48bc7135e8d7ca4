package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A restore onto a host that has no etcd.yaml: the manifest is derived from a survivor's (as a
// member of a new cluster) into the holding dir, then pointed at the restored data.
func TestRestoreOntoANewHostDerivesTheManifest(t *testing.T) {
	dir := t.TempDir()
	cfg := &Config{Recipe: "static-pod", ManifestsDir: filepath.Join(dir, "manifests"),
		HoldingDir: filepath.Join(dir, "held"), StateDir: filepath.Join(dir, "state"), DataRoot: "/var/lib"}
	r := &staticPod{cfg: cfg}
	req := &Request{Action: "restore", Member: "cp4", PeerURL: "https://10.0.0.4:2380",
		ClientURLs: []string{"https://10.0.0.4:2379"}, TemplateStdin: true,
		InitialCluster: "cp1=https://10.0.0.2:2380,cp4=https://10.0.0.4:2380"}
	if _, err := r.Current(&Request{Action: "restore", Member: "cp4"}, nil); err == nil ||
		!strings.Contains(err.Error(), "--template-stdin") {
		t.Fatalf("no manifest and no template: %v", err)
	}
	m, err := r.Current(req, bytes.NewReader(kubeadmManifest(t)))
	if err != nil {
		t.Fatal(err)
	}
	if m.Name != "cp4" || m.DataDir != "/var/lib/etcd" {
		t.Errorf("derived member %+v", m)
	}
	held, err := os.ReadFile(filepath.Join(cfg.HoldingDir, "etcd.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(held, []byte("initial-cluster-state")) {
		t.Error("a member of a new cluster got --initial-cluster-state (absent means new)")
	}
	// a second run finds the derived manifest and needs no template
	if m2, err := r.Current(&Request{Action: "restore", Member: "cp4"}, nil); err != nil || m2.Name != "cp4" {
		t.Fatalf("resumed: %+v %v", m2, err)
	}
	changed, err := r.Switch(req, m, "/var/lib/etcd.restored-x")
	if err != nil || !changed {
		t.Fatalf("switch: %v %v", changed, err)
	}
	after, _ := os.ReadFile(filepath.Join(cfg.HoldingDir, "etcd.yaml"))
	got := changedLines(t, string(held), string(after))
	if len(got) != 3 || got["      path: /var/lib/etcd\n"] != "      path: /var/lib/etcd.restored-x\n" {
		t.Errorf("switch changed %q", got)
	}
	if changed, err := r.Switch(req, m, "/var/lib/etcd.restored-x"); err != nil || changed {
		t.Errorf("second switch: %v %v", changed, err)
	}
	// the kubelet must not see it before the start
	if exists(filepath.Join(cfg.ManifestsDir, "etcd.yaml")) {
		t.Error("the derived manifest went into the manifests dir")
	}
}

// A renamed member (restore --replaces): its identity is rewritten with the data dir.
func TestRestoreRenamesAMember(t *testing.T) {
	dir := t.TempDir()
	cfg := &Config{Recipe: "static-pod", ManifestsDir: filepath.Join(dir, "manifests"),
		HoldingDir: filepath.Join(dir, "held"), StateDir: filepath.Join(dir, "state"), DataRoot: "/var/lib"}
	if err := os.MkdirAll(cfg.HoldingDir, 0o700); err != nil {
		t.Fatal(err)
	}
	raw := kubeadmManifest(t)
	if err := os.WriteFile(filepath.Join(cfg.HoldingDir, "etcd.yaml"), raw, 0o600); err != nil {
		t.Fatal(err)
	}
	r := &staticPod{cfg: cfg}
	req := &Request{Action: "restore", Member: "cp1b", Replaces: "cp1", PeerURL: "https://10.0.0.2:2380",
		InitialCluster: "cp1b=https://10.0.0.2:2380,cp2=https://10.0.0.3:2380"}
	if _, err := r.Current(&Request{Action: "restore", Member: "cp1b"}, nil); err == nil {
		t.Fatal("another member's manifest was accepted without --replaces")
	}
	m, err := r.Current(req, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Switch(req, m, "/var/lib/etcd.restored-y"); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(filepath.Join(cfg.HoldingDir, "etcd.yaml"))
	got := changedLines(t, string(raw), string(after))
	for _, line := range []string{"    - --name=cp1\n", "    - --initial-cluster=cp1=https://10.0.0.2:2380\n",
		"    - --data-dir=/var/lib/etcd\n"} {
		if _, ok := got[line]; !ok {
			t.Errorf("%q not rewritten", line)
		}
	}
	if len(got) != 5 {
		t.Errorf("changed lines %q", got)
	}
}
