package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func env(vars map[string]string) func(string) string {
	return func(k string) string { return vars[k] }
}

const sum = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

// runLine runs the program in-process and returns its exit status and its one JSON answer.
func runLine(t *testing.T, args []string, vars map[string]string) (int, map[string]any) {
	t.Helper()
	var out bytes.Buffer
	code := run(args, env(vars), strings.NewReader(""), &out)
	lines := strings.Split(strings.TrimRight(out.String(), "\n"), "\n")
	if len(lines) != 1 {
		t.Fatalf("%d lines of output: %q", len(lines), out.String())
	}
	var ans map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &ans); err != nil {
		t.Fatalf("not JSON: %q", lines[0])
	}
	return code, ans
}

func TestBadInputIsRefusedWithExit2AndOneLine(t *testing.T) {
	dir := t.TempDir()
	base := []string{"--recipe", "static-pod", "--state-dir", dir}
	restore := []string{"restore", "--member", "m1", "--fence", "1", "--snapshot", "s.db", "--sha256", sum,
		"--initial-cluster", "m1=http://10.0.0.1:2380", "--token", "t1", "--peer-url", "http://10.0.0.1:2380"}
	cases := map[string][]string{
		"no action":                 {},
		"unknown action":            {"rm", "--member", "m1"},
		"shell metacharacters":      {"status", "--member", "m1;reboot"},
		"spaces in a name":          {"status", "--member", "m 1"},
		"unknown flag":              {"stop", "--member", "m1", "--fence", "1", "--force"},
		"a flag of another action":  {"stop", "--member", "m1", "--fence", "1", "--token", "x"},
		"stray argument":            {"status", "--member", "m1", "extra"},
		"no fence":                  {"stop", "--member", "m1"},
		"negative fence":            {"stop", "--member", "m1", "--fence", "-1"},
		"fence not a number":        {"stop", "--member", "m1", "--fence", "1e3"},
		"url with a path":           append(append([]string{}, restore[:len(restore)-1]...), "http://10.0.0.1:2380/x"),
		"url with userinfo":         append(append([]string{}, restore[:len(restore)-1]...), "http://u@10.0.0.1:2380"),
		"url without a port":        append(append([]string{}, restore[:len(restore)-1]...), "http://10.0.0.1"),
		"member not in the cluster": append(append([]string{}, restore...), "--client-url", "http://10.0.0.1:2379", "--member", "m2"),
		"peer url disagrees":        append(append([]string{}, restore[:len(restore)-1]...), "http://10.0.0.9:2380"),
		"bad sha256":                {"restore", "--member", "m1", "--fence", "1", "--snapshot", "s.db", "--sha256", "abc"},
		"snapshot outside its dir":  {"restore", "--member", "m1", "--fence", "1", "--snapshot", "/etc/shadow"},
		"snapshot with ..":          {"restore", "--member", "m1", "--fence", "1", "--snapshot", "../x"},
		"data dir outside the root": append(append([]string{}, restore...), "--data-dir", "/etc/etcd"),
		"data dir with ..":          append(append([]string{}, restore...), "--data-dir", "/var/lib/../etc"),
		"mark-compacted alone":      append(append([]string{}, restore...), "--mark-compacted"),
		"restore missing token":     {"restore", "--member", "m1", "--fence", "1", "--snapshot", "s.db", "--sha256", sum},
		"join flags without --join": {"start", "--member", "m1", "--fence", "1", "--peer-url", "http://10.0.0.1:2380"},
		"join and apiserver":        {"start", "--member", "m1", "--fence", "1", "--join", "--apiserver"},
		"token with a slash":        append(append([]string{}, restore[:10]...), "--token", "a/b", "--peer-url", "http://10.0.0.1:2380"),
		"timeout too long":          {"status", "--member", "m1", "--timeout", "86400"},
		"put-snapshot path":         {"put-snapshot", "--member", "m1", "--fence", "1", "--snapshot", "/var/lib/x", "--sha256", sum, "--size", "4"},
	}
	for name, args := range cases {
		code, ans := runLine(t, append(append([]string{}, base...), args...), nil)
		if code != 2 || ans["ok"] != false || ans["code"] != "bad_input" || ans["error"] == "" || ans["usage"] == "" {
			t.Errorf("%s: exit %d, answer %v", name, code, ans)
		}
		if m, ok := ans["member"]; ok && strings.ContainsAny(m.(string), "; ") {
			t.Errorf("%s: the answer echoes an invalid member name as the member: %v", name, m)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("bad input left state behind: %v", entries)
	}
}

func TestConfigIsChecked(t *testing.T) {
	cases := map[string][]string{
		"no recipe":                  {"status", "--member", "m1"},
		"unknown recipe":             {"--recipe", "docker", "status", "--member", "m1"},
		"relative dir":               {"--recipe", "static-pod", "--manifests-dir", "manifests", "status", "--member", "m1"},
		"holding inside manifests":   {"--recipe", "static-pod", "--holding-dir", "/etc/kubernetes/manifests/held", "status", "--member", "m1"},
		"unit name":                  {"--recipe", "systemd", "--unit", "etcd;x", "status", "--member", "m1"},
		"apiserver flag for systemd": {"--recipe", "systemd", "stop", "--member", "m1", "--fence", "1", "--with-apiserver"},
		"apiserver-only for systemd": {"--recipe", "systemd", "stop", "--member", "m1", "--fence", "1", "--apiserver-only"},
	}
	for name, args := range cases {
		if code, ans := runLine(t, args, nil); code != 2 || ans["code"] != "bad_input" {
			t.Errorf("%s: exit %d, answer %v", name, code, ans)
		}
	}
}

func TestForcedCommand(t *testing.T) {
	dir := t.TempDir()
	cfg := []string{"--recipe=static-pod", "--state-dir=" + dir, "--manifests-dir=" + filepath.Join(dir, "m"),
		"--holding-dir=" + filepath.Join(dir, "h")}
	forced := func(cmd string) (int, map[string]any) {
		return runLine(t, cfg, map[string]string{"SSH_ORIGINAL_COMMAND": cmd})
	}
	// the launcher's prefix is dropped; the node's own configuration may be repeated, not changed
	if code, ans := forced("sudo -n /usr/local/bin/etcd-chatops-node --state-dir=" + dir + " status --member m1"); code != 0 || ans["action"] != "status" {
		t.Errorf("status through the forced command: exit %d, %v", code, ans)
	}
	refused := map[string]string{
		"another etcdutl":   "etcd-chatops-node --etcdutl /tmp/evil restore --member m1",
		"another state dir": "etcd-chatops-node --state-dir /tmp status --member m1",
		"a shell":           "etcd-chatops-node status --member m1 && sh",
		"quotes":            `etcd-chatops-node status --member "m1"`,
		"command subst":     "etcd-chatops-node status --member $(id)",
		"backticks":         "etcd-chatops-node status --member `id`",
		"newline":           "etcd-chatops-node status --member m1\nreboot",
		"another program":   "/bin/sh -c id",
		"nothing":           " ",
	}
	for name, cmd := range refused {
		if code, ans := forced(cmd); code != 2 || ans["code"] != "bad_input" {
			t.Errorf("%s: exit %d, %v", name, code, ans)
		}
	}
	// an action on the forced command line itself is a misconfiguration
	code, ans := runLine(t, append(append([]string{}, cfg...), "status", "--member", "m1"),
		map[string]string{"SSH_ORIGINAL_COMMAND": "status --member m1"})
	if code != 2 || !strings.Contains(ans["error"].(string), "only configuration flags") {
		t.Errorf("action in both places: exit %d, %v", code, ans)
	}
}

func TestEnvironmentFlags(t *testing.T) {
	dir := t.TempDir()
	args := []string{"--recipe", "static-pod", "--state-dir", dir, "--manifests-dir", filepath.Join(dir, "m"),
		"--holding-dir", filepath.Join(dir, "h"), "stop", "--member", "m1"}
	if code, ans := runLine(t, args, map[string]string{"ETCD_CHATOPS_FENCE": "5"}); code != 0 || ans["fence"] != 5.0 {
		t.Errorf("fence from the environment: exit %d, %v", code, ans)
	}
	if code, ans := runLine(t, append(args, "--fence", "6"), map[string]string{"ETCD_CHATOPS_FENCE": "7"}); code != 2 {
		t.Errorf("disagreeing fence flag and variable: exit %d, %v", code, ans)
	}
}

// The bot gives a command launcher's restore ETCD_CHATOPS_BUMP_REVISION and ETCD_CHATOPS_MARK_COMPACTED=true
// (bot/domain/restore.py: bump_environment) exactly when the members' etcdutl takes the flags.
func TestTheBotsRevisionBumpVariables(t *testing.T) {
	vars := map[string]string{"ETCD_CHATOPS_BUMP_REVISION": "1000000000", "ETCD_CHATOPS_MARK_COMPACTED": "true"}
	args := []string{"--member", "m1", "--fence", "1", "--snapshot", "snap.db", "--sha256", sum, "--token", "t1",
		"--initial-cluster", "m1=http://10.0.0.1:2380", "--peer-url", "http://10.0.0.1:2380"}
	req, err := parseAction("restore", args, env(vars), &Config{DataRoot: "/var/lib"})
	if err != nil || req.BumpRevision != 1_000_000_000 || !req.MarkCompacted {
		t.Fatalf("restore with the bot's bump variables: %+v, %v", req, err)
	}
	argv := etcdutlArgv(&Config{Etcdutl: "etcdutl"}, req, "snap.db", "/var/lib/etcd.new")
	if got := strings.Join(argv[len(argv)-3:], " "); got != "--bump-revision 1000000000 --mark-compacted" {
		t.Errorf("etcdutl gets %q", got)
	}
}

func TestFencing(t *testing.T) {
	cfg := &Config{StateDir: t.TempDir()}
	if _, err := checkFence(cfg, "m1", 7); err != nil {
		t.Fatal(err)
	}
	if _, err := checkFence(cfg, "m1", 7); err != nil {
		t.Errorf("the same token again (a resumed plan) was refused: %v", err)
	}
	_, err := checkFence(cfg, "m1", 6)
	if f, ok := err.(*Failure); !ok || f.Code != "fenced" {
		t.Errorf("an older token was not fenced: %v", err)
	}
	if _, err := checkFence(cfg, "m2", 1); err != nil {
		t.Errorf("another member's token: %v", err)
	}
	if _, err := checkFence(cfg, "m1", 9); err != nil {
		t.Fatal(err)
	}
	if seen, _ := fenceSeen(cfg, "m1"); seen != 9 {
		t.Errorf("newest seen is %d, want 9", seen)
	}
}

func TestValidURL(t *testing.T) {
	for _, ok := range []string{"http://10.0.0.1:2380", "https://etcd-1.example.com:2379", "https://[fd00::1]:2380"} {
		if _, err := validURL(ok); err != nil {
			t.Errorf("%s refused: %v", ok, err)
		}
	}
	for _, bad := range []string{"ftp://10.0.0.1:21", "http://10.0.0.1:0", "http://10.0.0.1:99999", "http://a_b:1",
		"http://10.0.0.1:2380?x=1", "http://10.0.0.1:2380#f", "10.0.0.1:2380", "http://:2380", "http://10.0.0.1:02380"} {
		if _, err := validURL(bad); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}

func TestRestoredName(t *testing.T) {
	if got := restoredName("/var/lib/etcd", "etcd-chatops-restore-0123456789ab"); got != "/var/lib/etcd.restored-0123456789ab" {
		t.Error(got)
	}
	if got := restoredName("/var/lib/etcd.restored-aaaa", "bbbb"); got != "/var/lib/etcd.restored-bbbb" {
		t.Error(got)
	}
}
