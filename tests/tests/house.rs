//! The house rules of ARCHITECTURE.md, checked on every Rust source of the workspace: no
//! file over 800 lines, and no function over 120 lines unless its doc comment says why it
//! must be one piece ("One piece: ...").

use std::path::{Path, PathBuf};

use syn::spanned::Spanned;
use syn::visit::Visit;

const FILE_LINES_MAX: usize = 800;
const FN_LINES_MAX: usize = 120;

/// Every `.rs` file under the workspace's crates (not build output, not the fuzz corpus).
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" && name != "corpus" {
                sources(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

/// Functions longer than the limit whose doc comment does not say why.
struct LongFns<'a> {
    file: &'a Path,
    found: Vec<String>,
}

impl LongFns<'_> {
    fn check(&mut self, name: &syn::Ident, attrs: &[syn::Attribute], span: proc_macro2::Span) {
        let lines = span.end().line - span.start().line + 1;
        if lines <= FN_LINES_MAX {
            return;
        }
        let says_why = attrs.iter().any(|a| {
            a.path().is_ident("doc")
                && a.meta
                    .require_name_value()
                    .is_ok_and(|nv| quote_text(&nv.value).contains("One piece"))
        });
        if !says_why {
            self.found.push(format!(
                "{}:{}: fn {name} is {lines} lines",
                self.file.display(),
                span.start().line
            ));
        }
    }
}

fn quote_text(e: &syn::Expr) -> String {
    match e {
        syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(s),
            ..
        }) => s.value(),
        _ => String::new(),
    }
}

impl<'ast> Visit<'ast> for LongFns<'_> {
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.check(&f.sig.ident, &f.attrs, f.span());
        syn::visit::visit_item_fn(self, f);
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        self.check(&f.sig.ident, &f.attrs, f.span());
        syn::visit::visit_impl_item_fn(self, f);
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if f.default.is_some() {
            self.check(&f.sig.ident, &f.attrs, f.span());
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

#[test]
fn no_file_over_800_lines_and_no_long_function_without_a_reason() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for krate in [
        "ctk", "net", "nbd", "agent", "receiver", "sim", "demo", "tests", "benches", "fuzz",
    ] {
        sources(&root.join(krate), &mut files);
    }
    assert!(files.len() > 50, "found only {} sources", files.len());
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let lines = text.lines().count();
        if lines > FILE_LINES_MAX {
            broken.push(format!("{}: {lines} lines", file.display()));
        }
        let ast = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", file.display()));
        let mut v = LongFns {
            file,
            found: Vec::new(),
        };
        v.visit_file(&ast);
        broken.extend(v.found);
    }
    assert!(
        broken.is_empty(),
        "over the house limits ({FILE_LINES_MAX} lines a file, {FN_LINES_MAX} a function \
         without a \"One piece: ...\" doc line):\n{}",
        broken.join("\n")
    );
}

/// The checker itself: a long function is found, and the reason lets it through.
#[test]
fn the_checker_finds_a_long_function_and_accepts_a_reason() {
    let body = "    let x = 1;\n".repeat(FN_LINES_MAX);
    let bare = format!("fn long() {{\n{body}}}\n");
    let reasoned = format!("/// One piece: a test of the checker.\nfn long() {{\n{body}}}\n");
    let count = |text: &str| {
        let mut v = LongFns {
            file: Path::new("x.rs"),
            found: Vec::new(),
        };
        v.visit_file(&syn::parse_file(text).unwrap());
        v.found.len()
    };
    assert_eq!(count(&bare), 1);
    assert_eq!(count(&reasoned), 0);
}
