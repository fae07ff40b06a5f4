package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"go/types"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// Options select what Check type-checks.
type Options struct {
	// Dir is a directory inside the module; go list runs there.
	Dir string
	// GOARCH is the darwin architecture (arm64 or amd64).
	GOARCH string
	// Tests includes _test.go files (go list -test).
	Tests bool
	// Patterns are go list package patterns.
	Patterns []string
}

// Result is what one Check found.
type Result struct {
	// Errors are this module's type errors, "file:line:col: message",
	// sorted and with paths relative to Dir.
	Errors []string
	// Checked counts this module's packages, Graph every package loaded.
	Checked, Graph int
}

// listedPackage is the part of `go list -json` output Check needs.
type listedPackage struct {
	ImportPath string
	Name       string
	Dir        string
	GoFiles    []string
	CgoFiles   []string
	ImportMap  map[string]string
	ForTest    string
	Standard   bool
	Module     *struct {
		Path string
		Main bool
	}
	Error *struct {
		Pos string
		Err string
	}
}

// ours says whether p's errors are reported: packages of the main module,
// and patterns go list could not resolve to any module (a typo in the
// Makefile must not turn the check into a silent pass).
func (p *listedPackage) ours() bool {
	if p.Module != nil {
		return p.Module.Main
	}
	return !p.Standard && p.Error != nil
}

// Check lists the darwin package graph and type-checks it bottom-up,
// keeping errors only for packages of the main module.
func Check(ctx context.Context, o Options) (Result, error) {
	pkgs, order, err := goList(ctx, o)
	if err != nil {
		return Result{}, err
	}
	c := &checker{
		fset:  token.NewFileSet(),
		pkgs:  pkgs,
		done:  map[string]*types.Package{},
		busy:  map[string]bool{},
		sizes: types.SizesFor("gc", o.GOARCH),
	}
	if c.sizes == nil {
		return Result{}, fmt.Errorf("unknown GOARCH %q", o.GOARCH)
	}
	var res Result
	for _, path := range order {
		p := pkgs[path]
		// The generated test main (p.test) is not in the module's source.
		if strings.HasSuffix(p.ImportPath, ".test") {
			continue
		}
		if _, err := c.check(path); err != nil {
			return Result{}, err
		}
		if p.ours() {
			res.Checked++
		}
	}
	res.Graph = len(c.done)
	base, _ := filepath.Abs(o.Dir)
	seen := map[string]bool{}
	for _, e := range c.errs {
		if rel, err := filepath.Rel(base, e); err == nil && !strings.HasPrefix(rel, "..") {
			e = rel
		}
		// A file shared by a package and its test variant is checked twice.
		if !seen[e] {
			seen[e] = true
			res.Errors = append(res.Errors, e)
		}
	}
	sort.Strings(res.Errors)
	return res, nil
}

// goList runs go list for darwin with cgo on. go list evaluates build
// constraints (so _darwin.go and cgo files are selected) but never invokes
// the C compiler, which is what makes this work on Linux.
func goList(ctx context.Context, o Options) (map[string]*listedPackage, []string, error) {
	args := []string{"list", "-e", "-deps", "-json=ImportPath,Name,Dir,GoFiles,CgoFiles,ImportMap,ForTest,Standard,Module,Error"}
	if o.Tests {
		args = append(args, "-test")
	}
	args = append(args, "--")
	args = append(args, o.Patterns...)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = o.Dir
	cmd.Env = append(os.Environ(), "GOOS=darwin", "GOARCH="+o.GOARCH, "CGO_ENABLED=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, nil, fmt.Errorf("go list: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	pkgs := map[string]*listedPackage{}
	var order []string
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		p := new(listedPackage)
		if err := dec.Decode(p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, nil, fmt.Errorf("go list output: %w", err)
		}
		if _, dup := pkgs[p.ImportPath]; !dup {
			order = append(order, p.ImportPath)
		}
		pkgs[p.ImportPath] = p
	}
	return pkgs, order, nil
}

// checker type-checks packages on demand, each once.
type checker struct {
	fset  *token.FileSet
	pkgs  map[string]*listedPackage
	done  map[string]*types.Package
	busy  map[string]bool // import cycle guard
	sizes types.Sizes
	errs  []string
}

func (c *checker) check(path string) (*types.Package, error) {
	if path == "unsafe" {
		return types.Unsafe, nil
	}
	if tp, ok := c.done[path]; ok {
		return tp, nil
	}
	p, ok := c.pkgs[path]
	if !ok {
		return nil, fmt.Errorf("package %q is not in the go list graph", path)
	}
	if c.busy[path] {
		return nil, fmt.Errorf("import cycle through %q", path)
	}
	c.busy[path] = true
	defer delete(c.busy, path)

	report := func(msg string) {
		if p.ours() {
			c.errs = append(c.errs, msg)
		}
	}
	if p.Error != nil {
		if p.Error.Pos != "" {
			report(p.Error.Pos + ": " + p.Error.Err)
		} else {
			report(p.ImportPath + ": " + p.Error.Err)
		}
	}
	var files []*ast.File
	for _, name := range append(append([]string{}, p.GoFiles...), p.CgoFiles...) {
		if !filepath.IsAbs(name) {
			name = filepath.Join(p.Dir, name)
		}
		f, err := parser.ParseFile(c.fset, name, nil, parser.SkipObjectResolution)
		if err != nil {
			report(err.Error())
		}
		if f != nil {
			files = append(files, f)
		}
	}
	conf := types.Config{
		// `import "C"` becomes an empty fake package and every C.x use
		// is accepted, so cgo code type-checks without a C toolchain.
		FakeImportC: true,
		Sizes:       c.sizes,
		Importer:    importerFunc(func(imp string) (*types.Package, error) { return c.importFor(p, imp) }),
		Error: func(err error) {
			report(err.Error())
		},
	}
	// ImportPath of a test variant is "p [p.test]"; types wants the path.
	name, _, _ := strings.Cut(p.ImportPath, " ")
	tp, _ := conf.Check(name, c.fset, files, nil)
	c.done[path] = tp
	return tp, nil
}

// importFor resolves an import as seen from p: test variants and vendored
// packages are renamed through p's ImportMap.
func (c *checker) importFor(p *listedPackage, imp string) (*types.Package, error) {
	if mapped, ok := p.ImportMap[imp]; ok {
		imp = mapped
	}
	return c.check(imp)
}

type importerFunc func(path string) (*types.Package, error)

func (f importerFunc) Import(path string) (*types.Package, error) { return f(path) }
