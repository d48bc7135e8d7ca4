package main

import (
	"bufio"
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Just enough of systemd's unit file syntax to know what etcd is told: the [Service] section's
// Environment=, EnvironmentFile= and ExecStart= of the unit and its drop-ins, in systemd's order.

// systemUnitDirs are searched for the unit after --unit-dir (drop-ins are read from --unit-dir).
var systemUnitDirs = []string{"/usr/lib/systemd/system", "/lib/systemd/system"}

type unitInfo struct {
	Path      string
	DropIns   []string
	Env       map[string]string // the effective environment (EnvironmentFile= wins over Environment=)
	FromFiles map[string]string // what EnvironmentFile= files set
	ExecStart []string
}

func loadUnit(cfg *Config) (*unitInfo, error) {
	u := &unitInfo{Env: map[string]string{}, FromFiles: map[string]string{}}
	for _, dir := range append([]string{cfg.UnitDir}, systemUnitDirs...) {
		if p := filepath.Join(dir, cfg.Unit); exists(p) {
			u.Path = p
			break
		}
	}
	if u.Path == "" {
		return nil, fail("precondition", "unit %s not found in %s or %s", cfg.Unit, cfg.UnitDir,
			strings.Join(systemUnitDirs, ", "))
	}
	dropins, _ := filepath.Glob(filepath.Join(cfg.UnitDir, cfg.Unit+".d", "*.conf"))
	sort.Slice(dropins, func(i, j int) bool { return filepath.Base(dropins[i]) < filepath.Base(dropins[j]) })
	u.DropIns = dropins
	var envFiles []string
	for _, path := range append([]string{u.Path}, dropins...) {
		entries, err := readUnitFile(path)
		if err != nil {
			return nil, err
		}
		for _, e := range entries {
			switch e.key {
			case "Environment":
				if e.value == "" {
					u.Env = map[string]string{}
				}
				for _, w := range unitWords(e.value) {
					if k, v, ok := strings.Cut(w, "="); ok {
						u.Env[k] = v
					}
				}
			case "EnvironmentFile":
				if e.value == "" {
					envFiles = nil
				} else {
					envFiles = append(envFiles, e.value)
				}
			case "ExecStart":
				u.ExecStart = nil
				if e.value != "" {
					u.ExecStart = unitWords(strings.TrimLeft(e.value, "@-:+!"))
				}
			}
		}
	}
	for _, f := range envFiles {
		optional := strings.HasPrefix(f, "-")
		f = strings.TrimPrefix(f, "-")
		vars, err := readEnvFile(f)
		if err != nil && !(optional && errors.Is(err, fs.ErrNotExist)) {
			return nil, fail("precondition", "unit %s: EnvironmentFile %s: %v", cfg.Unit, f, err)
		}
		for k, v := range vars {
			u.Env[k], u.FromFiles[k] = v, v
		}
	}
	return u, nil
}

// Param is etcd's value for a flag: from ExecStart (--name=v or --name v), else ETCD_NAME.
func (u *unitInfo) Param(name string) string {
	if v, ok := u.execFlag(name); ok {
		return v
	}
	return u.Env[envName(name)]
}

func (u *unitInfo) execFlag(name string) (string, bool) {
	for i, a := range u.ExecStart {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
		if a == "--"+name && i+1 < len(u.ExecStart) {
			return u.ExecStart[i+1], true
		}
	}
	return "", false
}

// envName: data-dir → ETCD_DATA_DIR (etcd's own mapping of flags to variables).
func envName(flag string) string {
	return "ETCD_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

func flagName(env string) string {
	return strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(env, "ETCD_"), "_", "-"))
}

type unitEntry struct{ key, value string }

// readUnitFile returns the [Service] entries of a unit file, continuation lines joined.
func readUnitFile(path string) ([]unitEntry, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fail("failed", "cannot read %s: %v", path, err)
	}
	var out []unitEntry
	section := ""
	var pending string
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if pending != "" {
			line = pending + " " + line
			pending = ""
		}
		if strings.HasSuffix(line, "\\") {
			pending = strings.TrimSuffix(line, "\\")
			continue
		}
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[':
			section = strings.Trim(line, "[]")
		case section == "Service":
			if k, v, ok := strings.Cut(line, "="); ok {
				out = append(out, unitEntry{strings.TrimSpace(k), strings.TrimSpace(v)})
			}
		}
	}
	return out, nil
}

// unitWords splits a value into words, honouring "double" and 'single' quotes.
func unitWords(s string) []string {
	var words []string
	var cur strings.Builder
	inWord, quote := false, rune(0)
	for _, r := range s {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			cur.WriteRune(r)
		case r == '"' || r == '\'':
			quote, inWord = r, true
		case r == ' ' || r == '\t':
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words
}

func readEnvFile(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	vars := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok {
			vars[strings.TrimSpace(k)] = strings.Trim(strings.TrimSpace(v), `"'`)
		}
	}
	return vars, nil
}
