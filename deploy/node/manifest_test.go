package main

import (
	"os"
	"strings"
	"testing"
)

func kubeadmManifest(t *testing.T) []byte {
	t.Helper()
	raw, err := os.ReadFile("testdata/etcd.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// changedLines compares two texts line by line (the edits never add lines unless they insert).
func changedLines(t *testing.T, before, after string) map[string]string {
	t.Helper()
	a, b := strings.SplitAfter(before, "\n"), strings.SplitAfter(after, "\n")
	if len(a) != len(b) {
		t.Fatalf("line count changed: %d -> %d", len(a), len(b))
	}
	out := map[string]string{}
	for i := range a {
		if a[i] != b[i] {
			out[a[i]] = b[i]
		}
	}
	return out
}

func rewriteDataDir(t *testing.T, raw []byte, dir string) []byte {
	t.Helper()
	m, err := ParseManifest(raw)
	if err != nil {
		t.Fatal(err)
	}
	changes, err := m.dataDirChanges(dir)
	if err != nil {
		t.Fatal(err)
	}
	out, err := m.apply(changes)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestDataDirRewriteKeepsEveryOtherByte(t *testing.T) {
	raw := kubeadmManifest(t)
	out := rewriteDataDir(t, raw, "/var/lib/etcd.restored-abc")
	got := changedLines(t, string(raw), string(out))
	want := map[string]string{
		"    - --data-dir=/var/lib/etcd\n": "    - --data-dir=/var/lib/etcd.restored-abc\n",
		"    - mountPath: /var/lib/etcd\n": "    - mountPath: /var/lib/etcd.restored-abc\n",
		"      path: /var/lib/etcd\n":      "      path: /var/lib/etcd.restored-abc\n",
	}
	if len(got) != len(want) {
		t.Fatalf("changed lines: %q", got)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("line %q became %q, want %q", k, got[k], v)
		}
	}
	m, err := ParseManifest(out)
	if err != nil {
		t.Fatal(err)
	}
	if m.DataDir() != "/var/lib/etcd.restored-abc" || m.ContainerDataDir() != "/var/lib/etcd.restored-abc" {
		t.Errorf("parsed back: %s %s", m.DataDir(), m.ContainerDataDir())
	}
	// again: nothing left to change
	if m2, _ := ParseManifest(out); true {
		changes, err := m2.dataDirChanges("/var/lib/etcd.restored-abc")
		if err != nil || len(changes) != 0 {
			t.Errorf("second rewrite: %v %v", changes, err)
		}
	}
}

func TestRewriteKeepsCRLFCommentsAndQuotes(t *testing.T) {
	raw := strings.ReplaceAll(string(kubeadmManifest(t)), "    - --data-dir=/var/lib/etcd\n",
		"    - \"--data-dir=/var/lib/etcd\"   # kept\n")
	raw = strings.ReplaceAll(raw, "      path: /var/lib/etcd\n", "      path: '/var/lib/etcd'\n")
	raw = "# written by hand, édité\n" + strings.ReplaceAll(raw, "\n", "\r\n")
	out := string(rewriteDataDir(t, []byte(raw), "/data/new"))
	got := changedLines(t, raw, out)
	want := map[string]string{
		"    - \"--data-dir=/var/lib/etcd\"   # kept\r\n": "    - \"--data-dir=/data/new\"   # kept\r\n",
		"    - mountPath: /var/lib/etcd\r\n":              "    - mountPath: /data/new\r\n",
		"      path: '/var/lib/etcd'\r\n":                 "      path: '/data/new'\r\n",
	}
	if len(got) != len(want) {
		t.Fatalf("changed lines: %q", got)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("line %q became %q, want %q", k, got[k], v)
		}
	}
}

func TestCustomLayoutChangesOnlyTheHostPath(t *testing.T) {
	raw := strings.ReplaceAll(string(kubeadmManifest(t)), "      path: /var/lib/etcd\n", "      path: /data/etcd\n")
	out := string(rewriteDataDir(t, []byte(raw), "/data/etcd.restored-x"))
	got := changedLines(t, raw, out)
	if len(got) != 1 || got["      path: /data/etcd\n"] != "      path: /data/etcd.restored-x\n" {
		t.Fatalf("changed lines: %q", got)
	}
}

func TestLayoutsNotUnderstoodAreRefused(t *testing.T) {
	base := string(kubeadmManifest(t))
	cases := map[string]string{
		"flow command": strings.Replace(base, "  - command:\n    - etcd\n", "  - command: [etcd, --data-dir=/x]\n", 1),
		"separate flag": strings.Replace(base, "    - --data-dir=/var/lib/etcd\n",
			"    - --data-dir\n    - /var/lib/etcd\n", 1),
		"flag twice": strings.Replace(base, "    - --data-dir=/var/lib/etcd\n",
			"    - --data-dir=/var/lib/etcd\n    - --data-dir=/var/lib/other\n", 1),
		"folded value": strings.Replace(base, "      path: /var/lib/etcd\n", "      path: >-\n        /var/lib/etcd\n", 1),
	}
	for name, raw := range cases {
		m, err := ParseManifest([]byte(raw))
		if err != nil {
			continue // refused at parse time
		}
		changes, err := m.dataDirChanges("/var/lib/new")
		if err == nil {
			_, err = m.apply(changes)
		}
		if err == nil {
			t.Errorf("%s: rewritten instead of refused", name)
		}
	}
	twoContainers := strings.Replace(base, "    name: etcd\n", "    name: other\n  - name: sidecar\n    image: x\n", 1)
	for name, raw := range map[string]string{"two documents": base + "---\n" + base, "not a pod": "kind: Service\n",
		"no container named etcd among several": twoContainers} {
		if _, err := ParseManifest([]byte(raw)); err == nil {
			t.Errorf("%s: parsed", name)
		}
	}
}

func TestDeriveNewMember(t *testing.T) {
	raw := kubeadmManifest(t)
	req := &Request{Member: "cp4", PeerURL: "https://10.0.0.4:2380", ClientURLs: []string{"https://10.0.0.4:2379"},
		InitialCluster: "cp1=https://10.0.0.2:2380,cp3=https://10.0.0.5:2380,cp4=https://10.0.0.4:2380"}
	out, m, err := deriveManifest(raw, req, "existing")
	if err != nil {
		t.Fatal(err)
	}
	for flag, want := range map[string]string{"name": "cp4", "initial-advertise-peer-urls": "https://10.0.0.4:2380",
		"listen-peer-urls": "https://10.0.0.4:2380", "advertise-client-urls": "https://10.0.0.4:2379",
		"listen-client-urls": "https://127.0.0.1:2379,https://10.0.0.4:2379", "initial-cluster": req.InitialCluster,
		"initial-cluster-state": "existing", "data-dir": "/var/lib/etcd", "listen-metrics-urls": "http://127.0.0.1:2381",
		"cert-file": "/etc/kubernetes/pki/etcd/server.crt"} {
		if got := m.Param(flag); got != want {
			t.Errorf("--%s=%s, want %s", flag, got, want)
		}
	}
	text := string(out)
	if !strings.Contains(text, "    - --initial-cluster="+req.InitialCluster+"\n    - --initial-cluster-state=existing\n") {
		t.Errorf("--initial-cluster-state not inserted after --initial-cluster:\n%s", text)
	}
	if !strings.Contains(text, "kubeadm.kubernetes.io/etcd.advertise-client-urls: https://10.0.0.4:2379\n") {
		t.Errorf("annotation not rewritten")
	}
	if strings.Count(text, "10.0.0.2") != 1 {
		t.Errorf("the survivor's address is left in the derived manifest outside --initial-cluster")
	}
	// every line but the member's identity is the survivor's
	if d := len(strings.Split(text, "\n")) - len(strings.Split(string(raw), "\n")); d != 1 {
		t.Errorf("derived manifest has %d more lines, want 1", d)
	}
}

func TestDeriveRefusesALeftoverSurvivorAddress(t *testing.T) {
	raw := strings.Replace(string(kubeadmManifest(t)), "--listen-metrics-urls=http://127.0.0.1:2381",
		"--listen-metrics-urls=http://10.0.0.2:2381", 1)
	req := &Request{Member: "cp4", PeerURL: "https://10.0.0.4:2380", ClientURLs: []string{"https://10.0.0.4:2379"},
		InitialCluster: "cp1=https://10.0.0.2:2380,cp4=https://10.0.0.4:2380"}
	_, _, err := deriveManifest([]byte(raw), req, "existing")
	if err == nil || !strings.Contains(err.Error(), "10.0.0.2") {
		t.Fatalf("derived with the survivor's address still in it: %v", err)
	}
	_, _, err = deriveManifest(kubeadmManifest(t), &Request{Member: "cp1", PeerURL: "https://10.0.0.4:2380",
		ClientURLs: []string{"https://10.0.0.4:2379"}, InitialCluster: "cp1=https://10.0.0.4:2380"}, "existing")
	if err == nil {
		t.Fatal("derived a member from its own manifest")
	}
}

func TestMentionsAddressBoundaries(t *testing.T) {
	text := []byte("a: https://10.0.0.20:2379\nb: 10.0.0.2.5\nc: x10.0.0.2\n")
	if got := mentionsAddress(text, "https://10.0.0.2:2380"); got != "" {
		t.Errorf("found %q inside other addresses", got)
	}
	if got := mentionsAddress([]byte("host: 10.0.0.2\n"), "https://10.0.0.2:2380"); got != "10.0.0.2" {
		t.Errorf("missed the address: %q", got)
	}
	if got := mentionsAddress([]byte("--listen-metrics-urls=http://127.0.0.1:2381\n"), "http://127.0.0.1:2379"); got != "" {
		t.Errorf("a loopback host is matched by host and port, got %q", got)
	}
}
