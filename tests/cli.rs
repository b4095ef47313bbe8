//! The binary's behaviour at its edges: SIMD tier override, missing files, a closed stdout.

mod common;

use std::process::Stdio;

#[test]
fn ggrun_isa_forces_the_scalar_tier_and_warns_on_unknown_names() {
    let out = common::ggrun()
        .arg("cpu")
        .env("GGRUN_ISA", "scalar")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("active: scalar\n"));

    let out = common::ggrun()
        .arg("cpu")
        .env("GGRUN_ISA", "sse9")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("warning: GGRUN_ISA=sse9: unknown"), "{err}");
    let best = ggrun_quants::Isa::detect().name();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("active: {best}\n")));
}

#[test]
fn ggrun_cpu_prefetch_sets_the_weight_prefetch_distance() {
    let line = |env: Option<&str>| {
        let mut c = common::ggrun();
        c.arg("cpu");
        if let Some(v) = env {
            c.env("GGRUN_CPU_PREFETCH", v);
        }
        let out = c.output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("weight prefetch: "))
            .unwrap()
            .to_string()
    };
    assert_eq!(line(Some("4096")), "weight prefetch: 4096 bytes ahead");
    assert_eq!(line(Some("0")), "weight prefetch: 0 bytes ahead");
    // The default follows the vendor: Intel 8 KiB, others none.
    let want = if ggrun_quants::isa::vendor() == "GenuineIntel" {
        8192
    } else {
        0
    };
    assert_eq!(line(None), format!("weight prefetch: {want} bytes ahead"));
}

#[test]
fn missing_file_is_a_one_line_error() {
    let out = common::ggrun()
        .args(["info", "/nonexistent/model.gguf"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: /nonexistent/model.gguf: "), "{err}");
    // The cause is said once (it once came twice: in the message and again as its source).
    assert_eq!(err.matches("os error").count(), 1, "{err}");
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let model = common::fixture_models().remove(0);
    let mut child = common::ggrun()
        .arg("info")
        .arg(&model)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before anything is written
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

/// `-d N` (llama-bench's depth) measures pp and tg on a context already holding N tokens.
#[test]
fn bench_measures_at_a_depth() {
    let model = common::fixtures().join("nemo-tiny-q4_0.gguf");
    let v = common::json_output(common::ggrun().args(["bench", "-m"]).arg(&model).args([
        "-p", "16", "-n", "4", "-d", "48", "-r", "1", "-t", "1", "--json",
    ]));
    assert_eq!(v["depth"].as_u64(), Some(48), "{v}");
    assert!(v["pp_tok_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["tg_tok_s"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn bench_json_reports_pp_and_tg() {
    let model = common::fixtures().join("nemo-tiny-q4_0.gguf");
    let v = common::json_output(common::ggrun().args(["bench", "-m"]).arg(&model).args([
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "2",
        "-t",
        "1",
        "--json",
        "--roofline",
    ]));
    assert!(v["pp_tok_s"].as_f64().unwrap() > 0.0);
    // One bandwidth reading and one roofline share per measured tg round.
    let pct = v["tg_roofline_pct_all"].as_array().unwrap();
    assert_eq!(pct.len(), 2, "{v}");
    assert!(pct.iter().all(|p| p.as_f64().unwrap() > 0.0), "{v}");
    let range = v["read_gb_s_range"].as_array().unwrap();
    assert!(
        range[0].as_f64().unwrap() <= range[1].as_f64().unwrap(),
        "{v}"
    );
    assert!(v["bytes_per_token"].as_u64().unwrap() > 0, "{v}");
    assert!(v["tg_tok_s"].as_f64().unwrap() > 0.0);
    assert_eq!(
        v["pp_all"].as_array().unwrap().len(),
        2,
        "two measured repeats after the warm-up"
    );
}

#[test]
fn info_reports_the_plan_placement_flags_make_without_a_gpu() {
    let model = common::fixtures().join("nemo-tiny-q4_k_m.gguf");
    let v = common::json_output(
        common::ggrun()
            .args(["info", "--json", "--gpu-mem", "600MiB", "--n-cpu-moe", "2"])
            .arg(&model),
    );
    let p = &v["placement"];
    let on: Vec<u64> = serde_json::from_value(p["expert_layers_on_gpu"].clone()).unwrap();
    let ram: Vec<u64> = serde_json::from_value(p["expert_layers_in_ram"].clone()).unwrap();
    assert!(ram.iter().all(|l| !on.contains(l)), "{p}");
    assert!(on.iter().all(|&l| l >= 2) && !ram.is_empty(), "{p}");
    let file = std::fs::metadata(&model).unwrap().len();
    let weights = p["gpu_weight_bytes"].as_u64().unwrap() + p["cpu_weight_bytes"].as_u64().unwrap();
    assert!(weights <= file && weights > file / 2, "{p}");
    // A budget below the buffers alone is a one-line error, not a plan.
    let out = common::ggrun()
        .args(["info", "--gpu-mem", "1MiB"])
        .arg(&model)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("too small") && err.trim().lines().count() == 1,
        "{err}"
    );
}

/// Without -c, a GPU placement's context is the model's trained length capped by what the
/// budget holds beside the weights (an eighth of it when the model spills), never below 4096:
/// SmolLM2 (trained on 8192 tokens; a 93.8 MiB file, 22.5 KiB of f16 K/V per token, the
/// device cache's type) gets all of it in 2 GiB, and in 750 MiB what the file and the 512 MiB
/// of buffers leave (144.2 MiB: 6,562 tokens, in 256-token steps 6,400).
#[test]
fn the_default_context_on_a_gpu_follows_the_budget() {
    let model = common::smollm2();
    let n_ctx = |budget: &str| {
        let v = common::json_output(
            common::ggrun()
                .args(["info", "--json", "--gpu-mem", budget])
                .arg(&model),
        );
        v["placement"]["n_ctx"].as_u64().unwrap()
    };
    assert_eq!(n_ctx("2GiB"), 8192);
    assert_eq!(n_ctx("750MiB"), 6400);
}

/// `tune` on a CPU-only machine measures thread and batch plans, saves the winner as the
/// model's profile, and `run` and `bench` then use it without flags (stderr names the file);
/// `--no-profile` and explicit flags win over it.
#[test]
fn tune_saves_a_profile_that_run_and_bench_pick_up() {
    let model = common::fixtures().join("nemo-tiny-q4_0.gguf");
    let cache = tempfile::tempdir().unwrap();
    let cmd = || {
        let mut c = common::ggrun();
        c.env("GGRUN_CACHE_DIR", cache.path())
            .env("CUDA_VISIBLE_DEVICES", "");
        c
    };
    let v = common::json_output(cmd().args(["tune", "-m"]).arg(&model).args([
        "--time",
        "60s",
        "--n-prompt",
        "40",
        "--n-gen",
        "4",
        "-c",
        "128",
        "--json",
    ]));
    let plans = v["plans"].as_array().unwrap();
    assert!(!plans.is_empty());
    for p in plans {
        assert!(p["pp_tok_s"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["tg_tok_s"].as_f64().unwrap() > 0.0, "{p}");
    }
    assert!(plans.iter().any(|p| p["plan"] == v["winner"]));
    let path = std::path::PathBuf::from(v["profile"].as_str().unwrap());
    let saved = std::fs::read_to_string(&path).unwrap();
    assert!(
        saved.contains("device = \"cpu\"") && saved.contains("ctx_size = 128"),
        "{saved}"
    );
    // Change the saved threads to one that a default run would not pick, then check that bench
    // reports it (and that -t and --no-profile override it).
    std::fs::write(
        &path,
        saved
            .lines()
            .map(|l| {
                if l.starts_with("threads") {
                    "threads = 1".to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    // (stdout, stderr) of a command that must succeed.
    let outputs = |c: &mut std::process::Command| {
        let out = c.output().unwrap();
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "{err}");
        (String::from_utf8(out.stdout).unwrap(), err)
    };
    let bench = |extra: &[&str]| {
        outputs(
            cmd()
                .args(["bench", "-m"])
                .arg(&model)
                .args(["-p", "8", "-n", "2", "-r", "1"])
                .args(extra),
        )
    };
    let (o, e) = bench(&[]);
    assert!(o.contains("threads 1,"), "{o}");
    assert!(e.contains(&path.display().to_string()), "{e}");
    let (o, _) = bench(&["-t", "2"]);
    assert!(o.contains("threads 2,"), "{o}");
    // (-t is capped at the CPUs available: 2 is the most every test machine has.)
    let (o, e) = bench(&["--no-profile", "-t", "2"]);
    assert!(o.contains("threads 2,") && !e.contains("profile"), "{o}{e}");
    let (_, err) = outputs(
        cmd()
            .args(["run", "--raw", "-n", "2", "-p", "hello", "-m"])
            .arg(&model),
    );
    assert!(err.contains("profile") && err.contains("-t 1"), "{err}");
    // A damaged profile is a warning, not a failed run.
    std::fs::write(&path, "not = [toml").unwrap();
    let (_, err) = outputs(
        cmd()
            .args(["run", "--raw", "-n", "2", "-p", "hello", "-m"])
            .arg(&model),
    );
    assert!(
        err.contains("warning: the tuned profile is ignored"),
        "{err}"
    );
}

/// `bench --routing-stats`: per MoE layer, the selections of the last --routing-window tokens
/// (each token selects expert_used_count experts, so selections = window tokens · k), for every
/// MoE layer of the model, with their shares and in text too.
#[test]
fn bench_reports_routing_over_a_rolling_window() {
    let model = common::fixtures().join("nemo-tiny-q8_0.gguf");
    let run = |json: bool| {
        let mut c = common::ggrun();
        c.args(["bench", "-p", "40", "-n", "70", "-r", "1", "-t", "2"])
            .args(["--routing-stats", "--routing-window", "64", "-m"])
            .arg(&model);
        if json {
            c.arg("--json");
        }
        c
    };
    let v = common::json_output(&mut run(true));
    let r = &v["routing"];
    let tokens = r["window_tokens"].as_u64().unwrap();
    // Snapshots every 32 generated tokens and after each prompt: the window reaches back at
    // least 64 tokens and at most one snapshot interval more.
    assert!((64..=64 + 40).contains(&tokens), "{r}");
    let layers = r["layers"].as_array().unwrap();
    let ids: Vec<u64> = layers
        .iter()
        .map(|l| l["layer"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 4, 7], "{r}");
    for l in layers {
        let counts: Vec<u64> = l["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect();
        assert_eq!(counts.len(), 16);
        assert_eq!(counts.iter().sum::<u64>(), tokens * 4, "{l}");
        assert_eq!(l["selections"].as_u64().unwrap(), tokens * 4);
        let (eighth, quarter) = (
            l["top_eighth_share"].as_f64().unwrap(),
            l["top_quarter_share"].as_f64().unwrap(),
        );
        assert!(0.0 < eighth && eighth <= quarter && quarter <= 1.0, "{l}");
        let eff = l["effective_experts"].as_f64().unwrap();
        assert!((1.0..=16.0).contains(&eff), "{l}");
    }
    let text = common::stdout_of(&mut run(false));
    assert!(text.contains("routing over the last"), "{text}");
    assert!(text.contains("layer  selections  used  effective  top 1/8  top 1/4"));
}
