//! The parquet tables rebuilt from the stored results, and the detection validation's files.

use super::*;

/// variants.parquet (one row per variant and replicate) and outcomes.parquet (one row per
/// prompt and score), rebuilt from the stored results. No wall-clock figure goes in, so a
/// resumed run's tables equal an uninterrupted run's byte for byte (timings stay in the score
/// files).
pub fn write_tables(run: &RunDir) -> Result<()> {
    let r = read_results(run.root())?;
    let names: BTreeMap<&str, &PlannedVariant> =
        r.plan.variants.iter().map(|v| (v.id.as_str(), v)).collect();
    let (mut id, mut name, mut handling, mut rep, mut key, mut dims, mut shared) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut k, mut n, mut rate, mut lo, mut hi, mut kl, mut over) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for a in &r.assignments {
        let Some(s) = r.scores.get(&(a.replicate, a.key.clone())) else {
            continue;
        };
        let Some(pv) = names.get(a.variant_id.as_str()) else {
            continue;
        };
        let rr = s.outcome.refusal_rate();
        id.push(a.variant_id.clone());
        name.push(pv.variant.name.clone());
        handling.push(crate::study::plan::handling_label(&pv.variant));
        rep.push(a.replicate);
        key.push(a.key.clone());
        dims.push(format!("{:?}", a.dims));
        shared.push(s.variant_ids.len() as u32);
        k.push(rr.k as u32);
        n.push(rr.n as u32);
        rate.push(rr.rate);
        lo.push(rr.lo);
        hi.push(rr.hi);
        kl.push(s.outcome.kl_mean());
        over.push(s.outcome.over_refusal_rate().rate);
    }
    let height = id.len();
    let mut df = DataFrame::new(
        height,
        vec![
            Column::new("variant_id".into(), id),
            Column::new("name".into(), name),
            Column::new("handling".into(), handling),
            Column::new("replicate".into(), rep),
            Column::new("score_key".into(), key),
            Column::new("dims".into(), dims),
            Column::new("shared_by".into(), shared),
            Column::new("refusals".into(), k),
            Column::new("n_bad".into(), n),
            Column::new("refusal_rate".into(), rate),
            Column::new("refusal_lo".into(), lo),
            Column::new("refusal_hi".into(), hi),
            Column::new("kl_mean".into(), kl),
            Column::new("over_refusal_rate".into(), over),
        ],
    )?;
    detect::table::write_parquet(&mut df, &run.table("variants"))?;
    let (mut skey, mut srep, mut set, mut idx, mut refused, mut reply, mut klv, mut overv) = (
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
    );
    // The prompt set each prompt came from (None in runs made before it was recorded).
    let mut source: Vec<Option<String>> = Vec::new();
    // Every other classifier's label (and a judge's score) per reply, one column each.
    let classifiers: BTreeSet<&String> = r
        .scores
        .values()
        .flat_map(|s| s.outcome.labels.keys())
        .collect();
    let judges: BTreeSet<&String> = r
        .scores
        .values()
        .flat_map(|s| s.outcome.judge_scores.keys())
        .collect();
    let mut labels: Vec<Vec<Option<bool>>> = vec![Vec::new(); classifiers.len()];
    let mut scores: Vec<Vec<Option<f64>>> = vec![Vec::new(); judges.len()];
    for s in r.scores.values() {
        let n_bad = s.outcome.refused.len();
        for (c, col) in classifiers.iter().zip(labels.iter_mut()) {
            let l = s.outcome.labels.get(*c);
            col.extend((0..n_bad).map(|i| l.and_then(|v| v.get(i)).copied()));
            col.extend(std::iter::repeat_n(None, s.outcome.kl.len()));
        }
        for (j, col) in judges.iter().zip(scores.iter_mut()) {
            let p = s.outcome.judge_scores.get(*j);
            col.extend((0..n_bad).map(|i| p.and_then(|v| v.get(i).copied().flatten())));
            col.extend(std::iter::repeat_n(None, s.outcome.kl.len()));
        }
        let src = r.prompts.get(&s.replicate);
        let source_of = |side: &[String], i: usize| side.get(i).cloned();
        for (i, (rf, rp)) in s.outcome.refused.iter().zip(&s.outcome.replies).enumerate() {
            source.push(src.and_then(|p| source_of(&p.bad_sources, i)));
            skey.push(s.key.clone());
            srep.push(s.replicate);
            set.push("bad");
            idx.push(i as u32);
            refused.push(Some(*rf));
            reply.push(Some(rp.clone()));
            klv.push(None::<f64>);
            overv.push(None::<bool>);
        }
        for (i, x) in s.outcome.kl.iter().enumerate() {
            source.push(src.and_then(|p| source_of(&p.good_sources, i)));
            skey.push(s.key.clone());
            srep.push(s.replicate);
            set.push("good");
            idx.push(i as u32);
            refused.push(None);
            reply.push(None);
            klv.push(Some(*x));
            overv.push(s.outcome.over_refused.get(i).copied());
        }
    }
    let h = skey.len();
    let mut columns = vec![
        Column::new("score_key".into(), skey),
        Column::new("replicate".into(), srep),
        Column::new("set".into(), set),
        Column::new("prompt_index".into(), idx),
        Column::new("source".into(), source),
        Column::new("refused".into(), refused),
        Column::new("reply".into(), reply),
        Column::new("kl".into(), klv),
        Column::new("over_refused".into(), overv),
    ];
    for (c, col) in classifiers.iter().zip(labels) {
        columns.push(Column::new(format!("refused_by_{c}").into(), col));
    }
    for (j, col) in judges.iter().zip(scores) {
        columns.push(Column::new(format!("p_refusal_{j}").into(), col));
    }
    let mut df = DataFrame::new(h, columns)?;
    detect::table::write_parquet(&mut df, &run.table("outcomes"))?;
    Ok(())
}

/// The detection validation, if the run has one.
pub fn read_validation(dir: &Path) -> Result<Option<detect::validate::Validation>> {
    read_record(&RunDir::at(dir).validation())
}

/// The validation's record and its two tables; the JSON is written last, as its completion mark.
pub fn write_validation(run: &RunDir, v: &detect::validate::Validation) -> Result<()> {
    let dir = run.validation_dir();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let c = &v.candidates;
    let n = c.len();
    let mut df = DataFrame::new(
        n,
        vec![
            Column::new("dim".into(), c.iter().map(|x| x.dim).collect::<Vec<_>>()),
            Column::new(
                "first_state".into(),
                c.iter().map(|x| x.first_state).collect::<Vec<_>>(),
            ),
            Column::new(
                "peak_abs".into(),
                c.iter().map(|x| x.peak_abs).collect::<Vec<_>>(),
            ),
            Column::new(
                "peak_ratio".into(),
                c.iter().map(|x| x.peak_ratio).collect::<Vec<_>>(),
            ),
            Column::new(
                "zero_kl".into(),
                c.iter().map(|x| x.damage.zero_kl).collect::<Vec<_>>(),
            ),
            Column::new(
                "mean_kl".into(),
                c.iter().map(|x| x.damage.mean_kl).collect::<Vec<_>>(),
            ),
            Column::new(
                "zero_dll".into(),
                c.iter().map(|x| x.damage.zero_dll).collect::<Vec<_>>(),
            ),
            Column::new(
                "mean_dll".into(),
                c.iter().map(|x| x.damage.mean_dll).collect::<Vec<_>>(),
            ),
            Column::new(
                "massive".into(),
                c.iter().map(|x| x.massive).collect::<Vec<_>>(),
            ),
            Column::new(
                "instances".into(),
                c.iter()
                    .map(|x| x.positions.len() as u32)
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "tokens".into(),
                c.iter()
                    .map(|x| {
                        let mut t = x.tokens.clone();
                        t.sort();
                        t.dedup();
                        t.join("\u{1f}")
                    })
                    .collect::<Vec<_>>(),
            ),
        ],
    )?;
    detect::table::write_parquet(&mut df, &dir.join("candidates.parquet"))?;
    let s = &v.scored;
    let col = |f: &dyn Fn(&detect::validate::Scored) -> f64| s.iter().map(f).collect::<Vec<f64>>();
    let mut df = DataFrame::new(
        s.len(),
        vec![
            Column::new(
                "name".into(),
                s.iter().map(|x| x.name.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                "group".into(),
                s.iter().map(|x| x.group.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                "threshold".into(),
                s.iter().map(|x| x.threshold).collect::<Vec<_>>(),
            ),
            Column::new(
                "dims".into(),
                s.iter()
                    .map(|x| {
                        x.dims
                            .iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .collect::<Vec<_>>(),
            ),
            Column::new("precision".into(), col(&|x| x.dim.precision)),
            Column::new("recall".into(), col(&|x| x.dim.recall)),
            Column::new("f1".into(), col(&|x| x.dim.f1)),
            Column::new("entries".into(), col(&|x| x.ptd.detected as f64)),
            Column::new("entry_precision".into(), col(&|x| x.ptd.precision)),
            Column::new("entry_recall".into(), col(&|x| x.ptd.recall)),
            Column::new("entry_f1".into(), col(&|x| x.ptd.f1)),
        ],
    )?;
    detect::table::write_parquet(&mut df, &dir.join("scores.parquet"))?;
    write_record(&run.validation(), v)
}
