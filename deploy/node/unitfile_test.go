package main

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestUnitEnvironmentInSystemdOrder(t *testing.T) {
	dir := t.TempDir()
	write := func(path, text string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	envFile := filepath.Join(dir, "etcd.env")
	write(envFile, "# tls\nETCD_CERT_FILE=\"/etc/etcd/server.crt\"\n")
	write(filepath.Join(dir, "etcd.service"), "[Unit]\nDescription=etcd\n[Service]\nType=notify\n"+
		"Environment=ETCD_NAME=m1 \"ETCD_DATA_DIR=/var/lib/etcd\"\n"+
		"Environment=ETCD_LISTEN_CLIENT_URLS=http://127.0.0.1:2379\n"+
		"EnvironmentFile=-"+envFile+"\nEnvironmentFile=-/nonexistent\n"+
		"ExecStart=/usr/bin/etcd \\\n  --log-level warn\n[Install]\nWantedBy=multi-user.target\n")
	write(filepath.Join(dir, "etcd.service.d", "etcd-chatops.conf"), "[Service]\nEnvironment=\"ETCD_DATA_DIR=/var/lib/etcd.r1\"\n")
	write(filepath.Join(dir, "etcd.service.d", "10-exec.conf"), "[Service]\nExecStart=\nExecStart=-/usr/local/bin/etcd --name m1\n")
	u, err := loadUnit(&Config{UnitDir: dir, Unit: "etcd.service"})
	if err != nil {
		t.Fatal(err)
	}
	if got := u.Param("data-dir"); got != "/var/lib/etcd.r1" {
		t.Errorf("data dir %q: the drop-in should win over the unit", got)
	}
	if got := u.Param("cert-file"); got != "/etc/etcd/server.crt" {
		t.Errorf("cert file %q from the EnvironmentFile", got)
	}
	if !reflect.DeepEqual(u.ExecStart, []string{"/usr/local/bin/etcd", "--name", "m1"}) {
		t.Errorf("ExecStart %q: the drop-in's reset and new value", u.ExecStart)
	}
	if got := u.Param("name"); got != "m1" {
		t.Errorf("name %q", got)
	}
	if _, ok := u.execFlag("name"); !ok {
		t.Error("--name in ExecStart not seen")
	}
	if !reflect.DeepEqual(u.DropIns, []string{filepath.Join(dir, "etcd.service.d", "10-exec.conf"),
		filepath.Join(dir, "etcd.service.d", "etcd-chatops.conf")}) {
		t.Errorf("drop-in order %q", u.DropIns)
	}
}

func TestDropinRendering(t *testing.T) {
	text := renderDropin(map[string]string{"ETCD_NAME": "m1", "ETCD_DATA_DIR": "/var/lib/etcd.r"})
	want := "[Service]\nEnvironment=\"ETCD_DATA_DIR=/var/lib/etcd.r\"\nEnvironment=\"ETCD_NAME=m1\"\n"
	if len(text) < len(want) || text[len(text)-len(want):] != want {
		t.Errorf("drop-in:\n%s", text)
	}
}
