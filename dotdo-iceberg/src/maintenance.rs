//! Table maintenance: snapshot expiry and removal of files no snapshot references. Compaction
//! and collapse are in [`compact`](crate::compact).
//!
//! iceberg-rust 0.10.1's `expire_snapshots` rewrites metadata only, and it has no orphan-file
//! cleanup. [`IcebergColdStore::expire_snapshots`] expires by dotdo's commit time (the store's
//! clock), and [`IcebergColdStore::remove_unreferenced_files`] deletes every file under the
//! table's `data/` and `metadata/` directories that the current metadata does not reference (expired manifest lists, files of
//! failed or conflicting commits, superseded metadata JSON beyond the metadata log; except the
//! head files of table versions current within the retention, which a reader may still hold),
//! but only files older than a retention period, so a commit still in flight in another process
//! keeps its files. The retention must exceed the longest time a commit can take. User tables
//! have the same two ([`ArrowTable::expire_snapshots`](crate::ArrowTable::expire_snapshots),
//! [`ArrowTable::remove_unreferenced_files`](crate::ArrowTable::remove_unreferenced_files)).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::TryStreamExt;
use iceberg::transaction::{ApplyTransactionAction, Transaction};

use dotdo_core::{Error, ErrorKind, Result, SnapshotId, Timestamp};

use crate::error::{classify, classify_object_store, read_metadata_file};
use crate::store::IcebergColdStore;
use crate::summary;

/// What [`IcebergColdStore::expire_snapshots`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpireReport {
    /// Snapshots removed from the table metadata: the ones dotdo chose. (Through a catalog other
    /// than the SQL one, iceberg's expire action also applies the refs' own retention settings,
    /// which may remove more; those are not listed.)
    pub expired: Vec<SnapshotId>,
    /// Snapshots left in the table by the expiry as dotdo planned it (through another catalog,
    /// iceberg's action may remove more, see `expired`).
    pub retained: usize,
}

/// What [`IcebergColdStore::remove_unreferenced_files`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Files deleted (full locations).
    pub deleted: Vec<String>,
    /// Unreferenced files kept because they are younger than the retention period.
    pub kept_recent: usize,
    /// Files referenced by the table.
    pub referenced: usize,
    /// Unreferenced-looking files kept because the table names a file of the same name at a
    /// location this store does not map to its own keys (another spelling of the bucket's URL,
    /// such as `s3://bkt/…` for a store opened on `https://host/bkt/…`): possibly the very
    /// file, and never deleted on a guess.
    pub kept_named_elsewhere: usize,
}

impl IcebergColdStore {
    /// Expire snapshots committed more than `older_than` ago (by the store's clock), always
    /// keeping the newest `retain_last` (at least 1) snapshots, and the one that was current
    /// `older_than` ago: reads as of any time in that window stay answered (a snapshot is
    /// expired once a newer one is itself older than `older_than`). Deletes no files: run
    /// [`remove_unreferenced_files`](Self::remove_unreferenced_files) afterwards.
    ///
    /// Watermarks survive expiry: each dotdo snapshot's summary holds all of them, and the chain
    /// from every snapshot that stays (the head, tags, those younger than `older_than`) down to
    /// its nearest dotdo snapshot is kept when other engines committed on top. Expiry run by another engine that removes that snapshot leaves
    /// the watermarks unknown: dotdo then refuses the table as `Corrupt` rather than guess,
    /// unless the table property `dotdo.last-commit` names that snapshot and the foreign head
    /// sits directly on it (format-v2 tables on the SQL catalog; see
    /// `docs/iceberg-cold-store.md`, Maintenance).
    ///
    /// On the SQL catalog exactly the snapshots this plan names are removed, and every ref
    /// (tag or branch, whatever retention another engine set on it) stays with its history.
    /// Through other catalogs the commit is iceberg's expire action, which would also apply the
    /// refs' own retention settings on top: where they remove more than this plan (a branch's
    /// `max-snapshot-age-ms` giving up snapshots dotdo keeps, on `main` perhaps the one holding
    /// the watermarks; a ref older than its `max-ref-age-ms` or the table's
    /// `history.expire.max-ref-age-ms`, which would be dropped) the expiry is refused there
    /// (`InvalidInput`, nothing expired).
    pub async fn expire_snapshots(&self, older_than: Duration, retain_last: usize) -> Result<ExpireReport> {
        let ident = self.inner.ident.clone();
        self.expire_snapshots_of(&ident, older_than, retain_last).await
    }

    /// The table `ident` of this store's catalog, freshly loaded (the change table through
    /// [`refresh`](Self::refresh), which also updates the table this store reads).
    pub(crate) async fn load_fresh(&self, ident: &iceberg::TableIdent) -> Result<iceberg::table::Table> {
        if ident == &self.inner.ident {
            return self.refresh().await;
        }
        match crate::error::load_table(&*self.inner.catalog, ident).await {
            Ok(t) => Ok(t),
            Err(e) => {
                let what = format!("loading table {ident}");
                Err(crate::store::load_failure(self.inner.verifier.as_ref(), ident, e, &what).await)
            }
        }
    }

    /// [`expire_snapshots`](Self::expire_snapshots) of the table `ident` (the change table or a
    /// user table of this store's catalog).
    pub(crate) async fn expire_snapshots_of(
        &self,
        ident: &iceberg::TableIdent,
        older_than: Duration,
        retain_last: usize,
    ) -> Result<ExpireReport> {
        let what = format!("expiring snapshots of {ident}");
        let attempts = self.inner.settings.max_commit_attempts;
        // What failed attempts meant to expire: gone from the table a later attempt loads, they
        // were expired (that attempt landed after all), and the report says so.
        let mut unsure: Vec<i64> = Vec::new();
        for attempt in 0..attempts {
            let table = match self.load_fresh(ident).await {
                Ok(t) => t,
                // An earlier attempt may have landed, and the table that would tell cannot be
                // read: the outcome is unknown (the load's own error, `Unavailable` mostly, said
                // nothing was expired), as compaction answers.
                Err(e) if !unsure.is_empty() => {
                    return Err(Error::new(
                        ErrorKind::AmbiguousOutcome,
                        format!(
                            "{what}: an attempt's outcome is unknown and the table cannot be read back ({e}); \
                             expire again to settle it"
                        ),
                    )
                    .with_source(e))
                }
                Err(e) => return Err(e),
            };
            let landed: Vec<i64> =
                unsure.iter().copied().filter(|id| table.metadata().snapshot_by_id(*id).is_none()).collect();
            gc_enabled(&table, &what)?;
            crate::commit::refuse_v1_refs(&table, &what).await?;
            let Some(head) = table.metadata().current_snapshot_id() else { return Ok(ExpireReport::default()) };
            // A head whose history another engine reset (dotdo's snapshots are off its chain)
            // reads as `Corrupt`: expiring those snapshots would erase the evidence, and its
            // watermarks would then read as empty (replays written twice, stale committers let
            // through). Refused, nothing expired.
            if let Some(h) = table.metadata().current_snapshot() {
                let base = if ident != &self.inner.ident { summary::user_table_base } else { summary::dotdo_base };
                base(table.metadata(), h).map_err(|e| e.context(what.clone()))?;
            }
            let cutoff = Timestamp::from_micros(
                self.inner
                    .clock
                    .now()
                    .as_micros()
                    .saturating_sub(i64::try_from(older_than.as_micros()).unwrap_or(i64::MAX)),
            );
            // (Walked with a bound: damaged metadata whose parents loop is `Corrupt`, not an
            // endless walk; iceberg's own expire action, used below for other catalogs, has none.)
            let chain = crate::store::ancestors(&table.metadata_ref(), head).map_err(|e| e.context(what.clone()))?;
            let mut keep: HashSet<i64> = chain.iter().take(retain_last.max(1)).map(|s| s.snapshot_id()).collect();
            // The head's dotdo watermarks may live in an ancestor (when other engines committed
            // on top): keep the chain down to it, or the table's watermarks would be lost.
            keep.extend(chain_to_dotdo_base(table.metadata(), head));
            // Snapshots other engines named (tags, and branches with their history) stay:
            // iceberg refuses to expire a ref's head, and a branch needs its ancestors.
            for (snapshot, is_branch) in other_refs(table.metadata(), &what)? {
                if !is_branch {
                    keep.insert(snapshot);
                    keep.extend(chain_to_dotdo_base(table.metadata(), snapshot));
                } else if table.metadata().snapshot_by_id(snapshot).is_some() {
                    keep.extend(
                        crate::store::ancestors(&table.metadata_ref(), snapshot)?.iter().map(|s| s.snapshot_id()),
                    );
                }
            }
            // A snapshot's age is that of its chain's latest commit (the time reads go by): one
            // another engine stamped before its parent is as young as that parent.
            let committed = summary::effective_committed_at(table.metadata());
            // The head's ancestors down to the one that was current at the cutoff stay: a read as
            // of any time inside the window (after the cutoff, before the next snapshot) is
            // answered by that one (expired, such reads were `NotFound`).
            for s in &chain {
                keep.insert(s.snapshot_id());
                if committed(s) <= cutoff {
                    break;
                }
            }
            // Every snapshot that stays (kept, or younger than the cutoff) keeps the chain down to
            // its nearest dotdo snapshot: a read as of it needs that snapshot's watermarks.
            let mut staying: Vec<i64> = table
                .metadata()
                .snapshots()
                .filter(|s| keep.contains(&s.snapshot_id()) || committed(s) >= cutoff)
                .map(|s| s.snapshot_id())
                .collect();
            // A snapshot that counts as committed at an ancestor's later time (another engine
            // stamped it before its parent) keeps the ancestors that time comes from: with them
            // expired it would count as committed at its own earlier stamp, and a read as of a
            // time before they existed would pick it (holding their rows).
            let mut raised = Vec::new();
            for &id in &staying {
                let mut cur = table.metadata().snapshot_by_id(id);
                let mut steps = 0;
                while let Some(s) = cur {
                    if summary::committed_at(s) >= committed(s) || steps > table.metadata().snapshots().len() {
                        break;
                    }
                    let Some(parent) = s.parent_snapshot_id() else { break };
                    raised.push(parent);
                    cur = table.metadata().snapshot_by_id(parent);
                    steps += 1;
                }
            }
            staying.extend(raised);
            for id in staying {
                keep.insert(id);
                keep.extend(chain_to_dotdo_base(table.metadata(), id));
            }
            let expired: Vec<i64> = table
                .metadata()
                .snapshots()
                .filter(|s| !keep.contains(&s.snapshot_id()) && committed(s) < cutoff)
                .map(|s| s.snapshot_id())
                .collect();
            let total = table.metadata().snapshots().len();
            if expired.is_empty() {
                return Ok(ExpireReport { expired: landed, retained: total });
            }
            // Whether a failed attempt certainly did not land (its ids are then not `unsure`): on
            // the SQL path every failure but `AmbiguousOutcome` (the pointer read back at its
            // base); through another catalog, a failure it marks so (refused by status, never
            // sent).
            let mut did_not_land = self.inner.verifier.is_some();
            let committed = if self.inner.verifier.is_some() {
                // Exactly the snapshots computed above, on exactly the metadata they were computed
                // from (the pointer swap fails if the table changed). iceberg's expire action
                // would also apply the refs' own retention: drop a tag or branch past its
                // `max_ref_age_ms` and expire a branch's ancestors past its snapshot age, which
                // may hold the watermarks.
                let md = table.metadata();
                let mut updates = vec![iceberg::TableUpdate::RemoveSnapshots { snapshot_ids: expired.clone() }];
                // Their statistics entries go with them, as iceberg's action removes them (the
                // files stay referenced, so never cleaned up, while an entry names them).
                for &snapshot_id in &expired {
                    if md.statistics_for_snapshot(snapshot_id).is_some() {
                        updates.push(iceberg::TableUpdate::RemoveStatistics { snapshot_id });
                    }
                    if md.partition_statistics_for_snapshot(snapshot_id).is_some() {
                        updates.push(iceberg::TableUpdate::RemovePartitionStatistics { snapshot_id });
                    }
                }
                self.commit_updates(&table, updates, vec![], &what).await.map(|_| ())
            } else {
                // Other catalogs take iceberg's action (iceberg-rust 0.10.1 sends no other commit
                // through them): the refs' own retention settings apply on top of this plan.
                // Committed through a view pinned to the planned table: iceberg's commit reloads
                // the table and applies the action to whatever it finds (this plan's ids on a
                // table another engine moved, unchecked); pinned, and checked unmoved just before
                // the commit (iceberg's action requires only the main branch's head: a tag made
                // meanwhile on a snapshot it removes would go with it), a moved table is a
                // conflict and the next attempt plans afresh.
                // iceberg's action applies the refs' own retention on top of this plan: where that
                // removes more (a snapshot a branch's `max-snapshot-age-ms` gives up, on `main`
                // perhaps the one holding the watermarks, for good; a ref past its age limit),
                // refused, nothing expired.
                if let Some(why) = beyond_the_plan(table.metadata(), &expired, &what)? {
                    return Err(Error::invalid(format!(
                        "{what}: {why}; through this catalog expiry is iceberg's expire action, which applies the \
                         refs' own retention on top of dotdo's plan: change that setting, or expire through the \
                         SQL catalog"
                    )));
                }
                let pinned = self.pinned(&table).unmoved_checked();
                let tx = Transaction::new(&table);
                let tx = tx
                    .expire_snapshots()
                    .expire_snapshot_ids(expired.clone())
                    // (The earliest time: no snapshot is expired for its age, also not one another
                    // engine stamped before 1970; only the ids named and the refs' own retention.)
                    .expire_older_than_ms(i64::MIN)
                    .retain_last(1)
                    .apply(tx)
                    .map_err(|e| classify(e, &what))?;
                crate::error::iceberg_panic_is_corrupt(&table, tx.commit(&pinned)).await.map(|_| ()).map_err(|e| {
                    // (Marked not sent if it failed before reaching the catalog: the check that
                    // the table is unmoved, a reload refused.)
                    let e = pinned.mark(e);
                    did_not_land = crate::catalog::did_not_land(&e);
                    classify(e, &what)
                })
            };
            match committed {
                Ok(()) => {
                    // The expiry landed: a failure to reload the table now (a busy catalog) is no
                    // failure of it (reads reload the table themselves).
                    if ident == &self.inner.ident {
                        if let Err(e) = self.refresh().await {
                            tracing::warn!(error = %e, "{what}: expired, but the table could not be reloaded");
                        }
                    }
                    let retained = total - expired.len();
                    return Ok(ExpireReport { expired: landed.into_iter().chain(expired).collect(), retained });
                }
                Err(err) => {
                    let again = err.is_retryable() || err.kind() == &ErrorKind::AmbiguousOutcome;
                    if !again || attempt + 1 == attempts {
                        return Err(err);
                    }
                    // It may have landed (a reply lost, which a catalog may report as a broken
                    // connection): its snapshots gone at the next attempt were expired by it. Not
                    // after a `Conflict`, or a failure known not to have landed (another writer's
                    // commit may have expired them itself).
                    let unknown = err.kind() == &ErrorKind::AmbiguousOutcome || !did_not_land;
                    if unknown && err.kind() != &ErrorKind::Conflict {
                        for &id in &expired {
                            if !unsure.contains(&id) {
                                unsure.push(id);
                            }
                        }
                    }
                    // Expiry is idempotent: reload and recompute.
                    crate::store::retry_pause(self.inner.settings.retry_base_delay).await;
                }
            }
        }
        Err(Error::new(ErrorKind::Conflict, format!("{what}: still conflicting")))
    }

    /// Delete files under the table's `data/` and `metadata/` directories that no snapshot,
    /// manifest or retained metadata file references and that are older than `retention` (by
    /// the store's clock against the store's last-modified time). Other tables that live under
    /// this table's location (a table named `data` or `metadata` included) are never touched:
    /// only files in this table's own layout are judged (metadata files directly in `metadata/`,
    /// data files in `data/` or its `field=value` partition directories; files another engine
    /// placed in other directories under `data/`, such as Iceberg's object-storage layout, are
    /// left alone). On a local warehouse dotdo opened, the staging files (`<name>#<n>`) that
    /// object_store writes before renaming a file into place, left behind by a process killed
    /// mid-write, are judged alike (never referenced) and counted in the report. A `retention` below
    /// [`Settings::min_cleanup_retention`](crate::Settings::min_cleanup_retention) (default 1
    /// hour) is `InvalidInput`: it could delete the files of a commit still in flight. So is one
    /// below the minimum the table records ([`MIN_CLEANUP_PROP`](crate::MIN_CLEANUP_PROP): the
    /// largest `min_cleanup_retention` a store opened it with, since that store's compactions
    /// commit files up to half of it old), and the table is read again before deleting, that
    /// minimum with it.
    pub async fn remove_unreferenced_files(&self, retention: Duration) -> Result<CleanupReport> {
        let ident = self.inner.ident.clone();
        self.remove_unreferenced_files_of(&ident, retention).await
    }

    /// [`remove_unreferenced_files`](Self::remove_unreferenced_files) of the table `ident` (the
    /// change table or a user table of this store's catalog).
    pub(crate) async fn remove_unreferenced_files_of(
        &self,
        ident: &iceberg::TableIdent,
        retention: Duration,
    ) -> Result<CleanupReport> {
        let min = self.inner.settings.min_cleanup_retention;
        if retention < min {
            return Err(Error::invalid(format!(
                "cleanup retention {retention:?} is below the configured minimum {min:?}: files of appends \
                 or compactions still in flight could be deleted (lower Settings::min_cleanup_retention \
                 only where no writer can be running)"
            )));
        }
        let mut table = self.load_fresh(ident).await?;
        let what = format!("removing unreferenced files of {ident}");
        gc_enabled(&table, &what)?;
        let recorded = table_cleanup_minimum(&table, &what)?;
        if retention < recorded {
            return Err(Error::invalid(format!(
                "{what}: retention {retention:?} is below the minimum the table records ({recorded:?}, table \
                 property {}: a store opened it with that min_cleanup_retention, and its compactions may \
                 commit files up to half of it old)",
                crate::MIN_CLEANUP_PROP
            )));
        }
        let cutoff_for = |retention: Duration| {
            self.inner.clock.now().as_micros().saturating_sub(i64::try_from(retention.as_micros()).unwrap_or(i64::MAX))
        };
        let cutoff = cutoff_for(retention);
        // Unreferenced files modified after this are kept (in-flight commits' files).
        let mut keep_after = cutoff;
        let root = &self.inner.root;
        let mut referenced: HashSet<String> = HashSet::new();
        let mut manifests = HashSet::new();
        let mut elsewhere = HashSet::new();
        let mut found = Gathered { referenced: &mut referenced, manifests: &mut manifests, elsewhere: &mut elsewhere };
        let moved = self.gather_settled(ident, &mut table, cutoff, &mut found, &what).await?;
        if moved {
            keep_after = keep_after.min(cutoff_for(table_cleanup_minimum(&table, &what)?));
        }
        let md = table.metadata();
        // Only the table's own `data/` and `metadata/` directories: another table can live
        // under this table's location (the SQL catalog places `ns.changes.events` at
        // `<warehouse>/ns/changes/events`), and its files are not ours to judge.
        if let Some(v) = &self.inner.verifier {
            let shared = v.tables_at(ident, &[md.location()], &self.inner.root).await?.concat();
            if !shared.is_empty() {
                return Err(Error::invalid(format!(
                    "{what}: its location {} is also the location of {}; a cleanup would delete that table's \
                     files as unreferenced (tables of two catalog names, or names differing only in case, on \
                     one warehouse); nothing deleted. Give one of them its own warehouse, namespace or name",
                    md.location(),
                    shared.join(", ")
                )));
            }
        }
        let prefix = root.key(md.location())?;
        let mut listed: Vec<object_store::ObjectMeta> = Vec::new();
        for dir in ["data", "metadata"] {
            let mut part: Vec<object_store::ObjectMeta> =
                root.store.list(Some(&prefix.child(dir))).try_collect().await.map_err(classify_object_store)?;
            listed.append(&mut part);
        }
        // A commit that landed while the table was read and listed (a compaction running longer
        // than the retention, whose new files are older than the cutoff) references files the
        // first pass did not see: read the table again and keep what it references too. (A
        // commit landing during the deletes below references no file older than half of
        // `min_cleanup_retention`: a compaction checks that before it commits, and appends
        // commit within seconds of writing.)
        let mut current = self.load_fresh(ident).await?;
        if current.metadata_location() != table.metadata_location() {
            // Another engine may have turned garbage collection off meanwhile (its files now
            // shared with another table).
            gc_enabled(&current, &what)?;
            self.gather_settled(ident, &mut current, cutoff, &mut found, &what).await?;
            // A store opened meanwhile with a larger minimum (whose compaction may already be
            // writing): files younger than that stay.
            keep_after = keep_after.min(cutoff_for(table_cleanup_minimum(&current, &what)?));
        }
        let mut report = CleanupReport { referenced: referenced.len(), ..Default::default() };
        for obj in listed {
            if referenced.contains(obj.location.as_ref()) || !own_layout(&prefix, &obj.location) {
                continue;
            }
            if obj.location.filename().is_some_and(|n| elsewhere.contains(n)) {
                report.kept_named_elsewhere += 1;
                continue;
            }
            if obj.last_modified.timestamp_micros() >= keep_after {
                report.kept_recent += 1;
                continue;
            }
            match root.store.delete(&obj.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                    report.deleted.push(format!("{}/{}", root.root, obj.location));
                }
                Err(e) => return Err(classify_object_store(e)),
            }
        }
        // object_store's local store writes each file as `<name>#<n>` first and renames it into
        // place; a process killed in between leaves that staging file, which its listings skip.
        // Judged here like any unreferenced file (never referenced: the table names the final
        // name): deleted once older than what is kept.
        let local_error = |e: std::io::Error, at: &std::path::Path, done: usize| {
            classify_object_store(object_store::Error::Generic { store: "LocalFileSystem", source: Box::new(e) })
                .context(format!("{what}: {} ({done} files deleted before)", at.display()))
        };
        for dir in ["data", "metadata"] {
            let dir_key = prefix.child(dir);
            let Some(local) = root.local_path_of(&dir_key) else { break };
            let listing = local.clone();
            let staged = tokio::task::spawn_blocking(move || staged_files(&listing))
                .await
                .map_err(|e| {
                    if e.is_cancelled() {
                        Error::new(ErrorKind::Shutdown, format!("{what}: the runtime is shutting down")).with_source(e)
                    } else {
                        Error::backend(format!("{what}: listing staging files failed")).with_source(e)
                    }
                })?
                .map_err(|e| local_error(e, &local, report.deleted.len()))?;
            for file in staged {
                let target = file.parts.iter().fold(dir_key.clone(), |p, part| p.child(part.as_str()));
                // (Never a file the table names: the rules below are object_store's, but a name
                // the table references is kept whatever it looks like.)
                let own = format!("{target}#{}", file.suffix);
                if !own_layout(&prefix, &target) || referenced.contains(&own) || referenced.contains(target.as_ref()) {
                    continue;
                }
                if file.modified_micros >= keep_after {
                    report.kept_recent += 1;
                    continue;
                }
                match std::fs::remove_file(&file.path) {
                    Ok(()) => report.deleted.push(format!("{}/{}#{}", root.root, target, file.suffix)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(local_error(e, &file.path, report.deleted.len())),
                }
            }
        }
        Ok(report)
    }

    /// [`add_referenced`](Self::add_referenced) of `table`, settled against a table that moves
    /// on meanwhile. A file the table names that goes missing while it is read is what another
    /// engine's (or node's) expiry and cleanup leave behind when they remove a snapshot during
    /// the read: the table is read again and its files gathered from the newer version, which
    /// `table` becomes; the missing file is `Corrupt` only if the table did not move on. (It
    /// failed the cleanup with `Corrupt`, for an intact table.) A failed pass's partial
    /// gathering is dropped (what earlier passes gathered stays kept). Whether `table`
    /// was replaced; a table that moves on at every one of four passes leaves the last pass's
    /// error (a damaged file stays `Corrupt`, whatever else commits meanwhile).
    async fn gather_settled(
        &self,
        ident: &iceberg::TableIdent,
        table: &mut iceberg::table::Table,
        cutoff: i64,
        found: &mut Gathered<'_>,
        what: &str,
    ) -> Result<bool> {
        let mut moved = false;
        let mut attempts = 0;
        loop {
            let before = (found.referenced.clone(), found.manifests.clone(), found.elsewhere.clone());
            let gathered = self.add_referenced(table, cutoff, found).await;
            let Err(e) = gathered else { return Ok(moved) };
            (*found.referenced, *found.manifests, *found.elsewhere) = before;
            if e.is_retryable() {
                return Err(e);
            }
            let now = self.load_fresh(ident).await?;
            attempts += 1;
            if now.metadata_location() == table.metadata_location() || attempts > 3 {
                return Err(e);
            }
            tracing::debug!(error = %e, "{what}: a file went missing while the table moved on; reading the newer table");
            gc_enabled(&now, what)?;
            *table = now;
            moved = true;
        }
    }

    /// Add every file `table` references (metadata, manifest lists, manifests, live data files,
    /// checkpoints, statistics, files removed less than the retention before `cutoff` ago, and
    /// the head files of the metadata log's versions current since `cutoff`) to `referenced`, as
    /// object-store keys; manifests already in `manifests` are not read again.
    async fn add_referenced(
        &self,
        table: &iceberg::table::Table,
        cutoff: i64,
        gathered: &mut Gathered<'_>,
    ) -> Result<()> {
        let root = &self.inner.root;
        let md = table.metadata();
        let removals = Removals::new(md, summary::effective_committed_at(md), cutoff);
        let Gathered { referenced, manifests, elsewhere } = gathered;
        let mut found = Referenced { root, referenced, manifests, elsewhere };
        if let Some(m) = table.metadata_location() {
            found.add(m)?;
        }
        for l in md.metadata_log() {
            found.add(&l.metadata_file)?;
        }
        for s in md.snapshots() {
            // A `Deleted` entry records a file a snapshot removed (compaction); a retained older
            // snapshot that needs it lists it as live itself. A file removed less than
            // `retention` ago is kept anyway while a manifest still records its removal: a
            // reader (or a store with `refresh_reads` off) may still be scanning the snapshot
            // before. (A later compaction that rewrites that manifest drops the record; the
            // table versions in the metadata log, walked below, then keep the file only while
            // the log still lists one that references it.)
            found.snapshot(table, s, Some(&removals)).await?;
        }
        // A reader (or a store with `refresh_reads` off) may hold a table version that was
        // current less than the retention ago and be scanning its head, whose files later
        // commits replaced and whose snapshot an expiry may have removed since: the versions in
        // the metadata log that were still current after the cutoff keep their head's manifest
        // list, manifests and live files. (The log holds the last
        // `write.metadata.previous-versions-max` versions, 20 on the change table dotdo creates
        // and Iceberg's default of 100 on user tables; one older than that
        // is not protected this way.)
        let log = md.metadata_log();
        for (k, entry) in log.iter().enumerate() {
            let until_ms = log.get(k + 1).map_or(md.last_updated_ms(), |next| next.timestamp_ms);
            if until_ms.saturating_mul(1000) < cutoff {
                continue;
            }
            let what = format!("metadata file {}", entry.metadata_file);
            // (iceberg's reader subtracts a metadata log's timestamps unchecked: a damaged or
            // foreign older version panicked a debug build; caught, it is `Corrupt`.)
            let read = iceberg::spec::TableMetadata::read_from(table.file_io(), &entry.metadata_file);
            let old = match crate::error::iceberg_catching(read, || what.clone()).await {
                Ok(old) => old,
                Err(e) => match classify(e, &what) {
                    e if e.is_retryable() => return Err(e),
                    // Gone or damaged: nothing of it can be read, so nothing to keep for it.
                    _ => continue,
                },
            };
            let Some(head) = old.current_snapshot().cloned() else { continue };
            let old = iceberg::table::Table::builder()
                .file_io(table.file_io().clone())
                .metadata(old)
                .metadata_location(entry.metadata_file.clone())
                .identifier(table.identifier().clone())
                .runtime(self.inner.runtime.clone())
                .readonly(true)
                .build()
                .map_err(|e| Error::backend(format!("{what}: a table handle of it")).with_source(e))?;
            // A manifest's entries are the same whichever version lists it. A head whose manifest
            // list or some manifests are gone or damaged (another engine's expiry deletes them at
            // once; an earlier cleanup with a shorter retention) protects what of it is left:
            // failing here would block every cleanup until the version left the retention.
            found.snapshot_tolerant(&old, &head).await?;
        }
        // The checkpoint of the newest dotdo commit, named by the table property too: after
        // another engine's expiry removed that commit's snapshot, it holds the watermarks.
        if let Some(cp) = summary::last_commit_checkpoint(md) {
            found.add(&cp)?;
        }
        for sf in md.statistics_iter() {
            found.add(&sf.statistics_path)?;
        }
        for pf in md.partition_statistics_iter() {
            found.add(&pf.statistics_path)?;
        }
        Ok(())
    }
}

/// The last segment of a location (its file name), if any: query and fragment left off.
fn file_name(location: &str) -> Option<&str> {
    let path = location.split(['?', '#']).next().unwrap_or(location);
    path.rsplit('/').next().filter(|n| !n.is_empty())
}

/// What a cleanup gathered so far: the files referenced (object-store keys), the manifests read,
/// and the file names of referenced locations elsewhere.
struct Gathered<'a> {
    referenced: &'a mut HashSet<String>,
    manifests: &'a mut HashSet<String>,
    elsewhere: &'a mut HashSet<String>,
}

/// The files a cleanup found referenced, as object-store keys, and the manifests read so far.
struct Referenced<'a> {
    root: &'a crate::storage::StoreRoot,
    referenced: &'a mut HashSet<String>,
    manifests: &'a mut HashSet<String>,
    /// The file names of referenced locations this store does not map to its keys.
    elsewhere: &'a mut HashSet<String>,
}

impl Referenced<'_> {
    fn add(&mut self, loc: &str) -> Result<()> {
        // A location in another bucket or scheme (another engine may write statistics or data
        // there) names no file this store lists by that name (it failed the cleanup). But it
        // may be another spelling of this very store (`s3://bkt/…` for `https://host/bkt/…`,
        // `az://` for `abfss://`): its file name is kept aside, and a listed file of that name
        // is never deleted.
        if !self.root.holds(loc) {
            if let Some(name) = file_name(loc) {
                self.elsewhere.insert(name.to_string());
            }
            return Ok(());
        }
        self.referenced.insert(self.root.key(loc)?.to_string());
        Ok(())
    }

    /// Snapshot `s` of `table`: its manifest list and checkpoint, its manifests not read yet,
    /// and the data files they list live or, with `removals`, removed since its cutoff.
    async fn snapshot(
        &mut self,
        table: &iceberg::table::Table,
        s: &iceberg::spec::SnapshotRef,
        removals: Option<&Removals<'_>>,
    ) -> Result<()> {
        self.snapshot_as(table, s, removals, false).await
    }

    /// [`snapshot`](Self::snapshot) of an old version's head: a manifest list or manifest that
    /// is gone or damaged (`Corrupt`) is skipped, the others read; any other error fails, and so
    /// does one at a location this store does not map (also `Corrupt` to a read: it may be
    /// another spelling of this store, whose files it names must not be judged unreferenced).
    async fn snapshot_tolerant(&mut self, table: &iceberg::table::Table, s: &iceberg::spec::SnapshotRef) -> Result<()> {
        self.snapshot_as(table, s, None, true).await
    }

    async fn snapshot_as(
        &mut self,
        table: &iceberg::table::Table,
        s: &iceberg::spec::SnapshotRef,
        removals: Option<&Removals<'_>>,
        tolerant: bool,
    ) -> Result<()> {
        let root = self.root;
        let skip = |e: &Error, loc: &str| tolerant && e.kind() == &ErrorKind::Corrupt && root.holds(loc);
        self.add(s.manifest_list())?;
        if let Some(cp) = summary::checkpoint(s) {
            self.add(cp)?;
        }
        let what = format!("manifest list {}", s.manifest_list());
        let list = match read_metadata_file(&what, table.manifest_list_reader(s).load()).await {
            Ok(list) => list,
            Err(e) if skip(&e, s.manifest_list()) => {
                tracing::debug!(error = %e, "cleanup: an old head's manifest list is gone");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for mf in list.entries() {
            // Recorded as read only once its files are gathered: one whose read failed (and
            // a failed pass gathered again, see `gather_settled`) is read again, never skipped
            // with its data files left unreferenced.
            if self.manifests.contains(&mf.manifest_path) {
                continue;
            }
            self.add(&mf.manifest_path)?;
            let what = format!("manifest {}", mf.manifest_path);
            let m = match read_metadata_file(&what, mf.load_manifest(table.file_io())).await {
                Ok(m) => m,
                Err(e) if skip(&e, &mf.manifest_path) => {
                    tracing::debug!(error = %e, "cleanup: an old head's manifest is gone");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut recently_removed = removals.map(|r| r.of(mf));
            for e in m.entries() {
                if e.is_alive() || recently_removed.as_mut().is_some_and(|removed| removed(e)) {
                    self.add(e.data_file().file_path())?;
                }
            }
            self.manifests.insert(mf.manifest_path.clone());
        }
        Ok(())
    }
}

/// When the files that manifests record as removed (`Deleted` entries) were removed, as far as
/// table metadata tells: the cleanup keeps a file removed since a cutoff, and a rewrite keeps a
/// manifest that lists only such records while they are recent (see `rewrite_listed`; the
/// records of a manifest it merges are dropped).
pub(crate) struct Removals<'a> {
    md: &'a iceberg::spec::TableMetadata,
    /// Snapshot times as reads go by them (never before a parent's).
    committed: Box<dyn Fn(&iceberg::spec::Snapshot) -> Timestamp + Send + Sync + 'a>,
    /// Microseconds since the epoch.
    cutoff: i64,
}

impl<'a> Removals<'a> {
    /// Removals of `md`'s manifests judged against `cutoff` (microseconds since the epoch), with
    /// `committed` the snapshot times of `md` ([`summary::effective_committed_at`]).
    pub(crate) fn new(
        md: &'a iceberg::spec::TableMetadata,
        committed: impl Fn(&iceberg::spec::Snapshot) -> Timestamp + Send + Sync + 'a,
        cutoff: i64,
    ) -> Self {
        Removals { md, committed: Box::new(committed), cutoff }
    }

    /// Whether an entry of manifest `mf` records a file removed at or after the cutoff: by the
    /// commit time of the snapshot that removed it; if that snapshot was expired since, the
    /// removal happened no later than the first retained snapshot at or after the manifest's
    /// sequence number, so it counts as recent while that one is (or if there is none).
    pub(crate) fn of<'m>(
        &'m self,
        mf: &'m iceberg::spec::ManifestFile,
    ) -> impl FnMut(&iceberg::spec::ManifestEntry) -> bool + 'm {
        let mut by_expired: Option<bool> = None;
        move |e| {
            if e.is_alive() {
                return false;
            }
            match e.snapshot_id().and_then(|id| self.md.snapshot_by_id(id)) {
                Some(s) => (self.committed)(s).as_micros() >= self.cutoff,
                None => *by_expired.get_or_insert_with(|| {
                    self.md
                        .snapshots()
                        .filter(|s| s.sequence_number() >= mf.sequence_number)
                        .map(|s| (self.committed)(s).as_micros())
                        .min()
                        .is_none_or(|at| at >= self.cutoff)
                }),
            }
        }
    }
}

/// The ids from snapshot `id` down its parents to its nearest dotdo snapshot (both included),
/// whose `dotdo.*` properties hold for it ([`summary::dotdo_base`]); as far as the chain goes.
fn chain_to_dotdo_base(md: &iceberg::spec::TableMetadata, id: i64) -> Vec<i64> {
    md.snapshot_by_id(id)
        .map(|s| summary::chain_to_dotdo(md, s).0.iter().map(|s| s.snapshot_id()).collect())
        .unwrap_or_default()
}

/// A staging file object_store's local store left (`<name>#<n>`, see
/// [`remove_unreferenced_files`](IcebergColdStore::remove_unreferenced_files)).
struct StagedFile {
    path: std::path::PathBuf,
    /// The path of the file it would have become, relative to the listed directory.
    parts: Vec<String>,
    /// The `<n>` of its name.
    suffix: String,
    modified_micros: i64,
}

/// The staging files under local directory `dir` (recursively, not following links); none if
/// `dir` does not exist.
fn staged_files(dir: &std::path::Path) -> std::io::Result<Vec<StagedFile>> {
    let mut out = Vec::new();
    let mut todo = vec![(dir.to_path_buf(), Vec::<String>::new())];
    while let Some((at, parts)) = todo.pop() {
        let entries = match std::fs::read_dir(&at) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            let kind = entry.file_type()?;
            let mut here = parts.clone();
            if kind.is_dir() {
                here.push(name);
                todo.push((entry.path(), here));
                continue;
            }
            // As object_store's local store tells its staging files (`is_valid_file_path`): the
            // name's first `#` followed by digits only.
            let Some((target, suffix)) = name.split_once('#') else { continue };
            if !kind.is_file() || target.is_empty() || suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit())
            {
                continue;
            }
            // Renamed into place (or deleted) since the directory was read: not a staging file
            // any more.
            let modified = match entry.metadata().and_then(|m| m.modified()) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let modified_micros = match modified.duration_since(std::time::UNIX_EPOCH) {
                Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
                Err(before) => -i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX),
            };
            here.push(target.to_string());
            out.push(StagedFile { path: entry.path(), parts: here, suffix: suffix.to_string(), modified_micros });
        }
    }
    Ok(out)
}

/// Whether `key` (under the table location `prefix`) is where this table's own files go:
/// metadata files directly in `metadata/`, data files in `data/` or its Hive-style partition
/// directories (`field=value`). Anything else there belongs to a table the catalog nested under
/// this one (a table named `data` or `metadata` lives at `<location>/data`, its files in
/// `<location>/data/data/` and `<location>/data/metadata/`) and is never judged here. Nor is
/// `metadata/version-hint.text`, which no metadata names but readers that find a table by its
/// path (a Hadoop catalog, DuckDB's `iceberg_scan` of a directory) start from, as Iceberg's own
/// orphan-file cleanup keeps it.
fn own_layout(prefix: &object_store::path::Path, key: &object_store::path::Path) -> bool {
    let Some(parts) = key.prefix_match(prefix) else { return false };
    let parts: Vec<_> = parts.collect();
    match parts.split_first() {
        Some((dir, rest)) if dir.as_ref() == "metadata" => rest.len() == 1 && rest[0].as_ref() != "version-hint.text",
        Some((dir, rest)) if dir.as_ref() == "data" => {
            rest.split_last().is_some_and(|(_, dirs)| dirs.iter().all(|d| d.as_ref().contains('=')))
        }
        _ => false,
    }
}

/// The snapshot refs of `md` by name. iceberg-rust 0.10.1 has no public accessor for the refs
/// map, so it is read from the metadata's own JSON form (the format's `refs` field).
fn refs_of(
    md: &iceberg::spec::TableMetadata,
    what: &str,
) -> Result<BTreeMap<String, iceberg::spec::SnapshotReference>> {
    let json = serde_json::to_value(md)
        .map_err(|e| Error::backend(format!("{what}: encoding table metadata to read its refs")).with_source(e))?;
    match json.get("refs") {
        Some(r) if !r.is_null() => serde_json::from_value(r.clone())
            .map_err(|e| Error::corrupt(format!("{what}: the table metadata's refs cannot be read")).with_source(e)),
        _ => Ok(BTreeMap::new()),
    }
}

/// The snapshot refs of `md` other than `main`, as (snapshot id, is a branch).
fn other_refs(md: &iceberg::spec::TableMetadata, what: &str) -> Result<Vec<(i64, bool)>> {
    Ok(refs_of(md, what)?
        .into_iter()
        .filter(|(name, _)| name != "main")
        .map(|(_, r)| (r.snapshot_id, matches!(r.retention, iceberg::spec::SnapshotRetention::Branch { .. })))
        .collect())
}

/// What iceberg-rust 0.10.1's expire action, called with dotdo's plan (`expired`, the earliest
/// cutoff, `retain_last(1)`), would remove beyond it, said as the reason to refuse; `None` if
/// nothing. Its rules (`ExpireSnapshotsAction::plan`): a ref other than `main` whose head is older
/// than its `max-ref-age-ms` (or the table's `history.expire.max-ref-age-ms`) is dropped; a
/// branch with its own `max-snapshot-age-ms` keeps its newest `min-snapshots-to-keep` (else 1)
/// ancestors and those younger than the age, and the other ancestors no ref keeps are expired.
/// The time is the wall clock iceberg reads, taken a minute later (it commits after this check).
fn beyond_the_plan(md: &iceberg::spec::TableMetadata, expired: &[i64], what: &str) -> Result<Option<String>> {
    use iceberg::spec::SnapshotRetention;
    let props = md.table_properties().map_err(|e| {
        Error::invalid(format!("{what}: the table properties cannot be read as iceberg's expire action reads them"))
            .with_source(e)
    })?;
    let refs = refs_of(md, what)?;
    let now = dotdo_core::Clock::now(&dotdo_core::SystemClock::new()).as_millis().saturating_add(60_000);
    let stamp = |id: i64| md.snapshot_by_id(id).map_or(i64::MIN, |s| s.timestamp_ms());
    let mut retained: HashSet<i64> = md.current_snapshot_id().into_iter().collect();
    let mut referenced = retained.clone();
    let mut branches = Vec::new();
    for (name, r) in &refs {
        let own_age = match r.retention {
            SnapshotRetention::Branch { max_ref_age_ms, .. } | SnapshotRetention::Tag { max_ref_age_ms } => {
                max_ref_age_ms
            }
        };
        let limit = own_age.unwrap_or(props.max_ref_age_ms);
        if name != "main"
            && md.snapshot_by_id(r.snapshot_id).is_some()
            && now.saturating_sub(stamp(r.snapshot_id)) > limit
        {
            let whose =
                if own_age.is_some() { "its max-ref-age-ms" } else { "the table's history.expire.max-ref-age-ms" };
            return Ok(Some(format!("ref {name:?} is older than {whose} ({limit} ms) and would be dropped")));
        }
        retained.insert(r.snapshot_id);
        referenced.insert(r.snapshot_id);
        if let SnapshotRetention::Branch { min_snapshots_to_keep, max_snapshot_age_ms, .. } = r.retention {
            // (As iceberg converts it: a negative count keeps every ancestor.)
            let keep = min_snapshots_to_keep.map_or(1, |m| usize::try_from(m).unwrap_or(usize::MAX));
            let cutoff = max_snapshot_age_ms.map_or(i64::MIN, |age| now.saturating_sub(age));
            branches.push((name.as_str(), r.snapshot_id, keep, cutoff));
        }
    }
    if let Some(current) = md.current_snapshot_id() {
        if !branches.iter().any(|(_, head, _, _)| *head == current) {
            branches.push(("main", current, 1, i64::MIN));
        }
    }
    let mut whose = BTreeMap::new();
    for (name, head, keep, cutoff) in branches {
        let (mut kept, mut next, mut steps) = (0usize, Some(head), 0usize);
        while let Some(id) = next {
            if steps > md.snapshots().len() {
                // A parent cycle in damaged metadata: iceberg's walk of it would never end.
                return Err(Error::corrupt(format!("{what}: the ancestors of branch {name:?} form a cycle")));
            }
            referenced.insert(id);
            if kept < keep || stamp(id) >= cutoff {
                retained.insert(id);
                kept += 1;
            } else {
                whose.entry(id).or_insert(name);
            }
            next = md.snapshot_by_id(id).and_then(|s| s.parent_snapshot_id());
            steps += 1;
        }
    }
    let beyond: Vec<(i64, &str)> = whose
        .into_iter()
        // (Only snapshots the table has: an expired parent is still named by its child, and
        // iceberg expires only what `snapshots()` lists.)
        .filter(|(id, _)| {
            md.snapshot_by_id(*id).is_some()
                && referenced.contains(id)
                && !retained.contains(id)
                && !expired.contains(id)
        })
        .collect();
    Ok(beyond.first().map(|(_, name)| {
        let ids: Vec<i64> = beyond.iter().map(|(id, _)| *id).collect();
        format!(
            "the max-snapshot-age-ms of branch {name:?} would also expire snapshots {ids:?}, which dotdo keeps (the \
             snapshots holding the watermarks, or a read's retention window)"
        )
    }))
}

/// The cleanup minimum `table` records; `InvalidInput` if the property is not a number.
fn table_cleanup_minimum(table: &iceberg::table::Table, what: &str) -> Result<Duration> {
    crate::store::recorded_cleanup_minimum(table.metadata()).map_err(|v| {
        Error::invalid(format!(
            "{what}: table property {}={v:?} is not a number of milliseconds; set it to one (the largest \
             min_cleanup_retention of the table's writers)",
            crate::MIN_CLEANUP_PROP
        ))
    })
}

/// Iceberg's `gc.enabled=false` (set where a table's files may be shared with another table, or
/// to keep history): snapshot expiry and file cleanup are refused, `InvalidInput`, as Java's
/// maintenance actions refuse them. (iceberg's own refusal surfaced as `Corrupt`, and the file
/// cleanup ignored the property.)
fn gc_enabled(table: &iceberg::table::Table, what: &str) -> Result<()> {
    // Parsed as Java's `Boolean.parseBoolean` does: anything but "true" (any case) disables it.
    match table.metadata().properties().get("gc.enabled") {
        Some(v) if !v.eq_ignore_ascii_case("true") => Err(Error::invalid(format!(
            "{what}: the table has gc.enabled={v:?}, which disables garbage collection (its files may be \
             shared with another table); set it to true to expire snapshots or remove files"
        ))),
        _ => Ok(()),
    }
}

// The tests open local warehouses, whose default catalog is the SQL catalog.
#[cfg(all(test, feature = "sql"))]
mod tests {
    use std::time::Duration;

    use dotdo_core::ColdSink;
    use iceberg::spec::{SnapshotReference, SnapshotRetention};

    /// Refs another engine set retention on are kept as they are: a tag past its
    /// `max_ref_age_ms` and a branch's ancestors past its snapshot age stay (iceberg's expire
    /// action dropped the tag and expired the ancestors, among them snapshots dotdo keeps).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refs_with_their_own_retention_are_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = crate::commit::tests::open_one_bucket(&dir).await;
        for seq in 1..=4u64 {
            cold.append(crate::commit::tests::batch("o", seq)).await.expect("append");
        }
        let t = cold.refresh().await.expect("table");
        let ids: Vec<i64> =
            crate::store::ancestors(&t.metadata_ref(), t.metadata().current_snapshot_id().expect("head"))
                .expect("ancestors")
                .iter()
                .map(|s| s.snapshot_id())
                .collect();
        let (head, first, second) = (ids[0], ids[3], ids[2]);
        let updates = vec![
            iceberg::TableUpdate::SetSnapshotRef {
                ref_name: "audit".into(),
                reference: SnapshotReference::new(first, SnapshotRetention::Tag { max_ref_age_ms: Some(1) }),
            },
            iceberg::TableUpdate::SetSnapshotRef {
                ref_name: "dev".into(),
                reference: SnapshotReference::new(
                    second,
                    SnapshotRetention::Branch {
                        min_snapshots_to_keep: Some(1),
                        max_snapshot_age_ms: Some(1),
                        max_ref_age_ms: None,
                    },
                ),
            },
        ];
        cold.commit_updates(&t, updates, vec![], "setting refs").await.expect("refs");
        #[allow(clippy::disallowed_methods)]
        tokio::time::sleep(Duration::from_millis(20)).await;
        let report = cold.expire_snapshots(Duration::ZERO, 1).await.expect("expire");
        let t = cold.refresh().await.expect("table");
        assert!(t.metadata().snapshot_for_ref("audit").is_some(), "the tag stays");
        assert!(t.metadata().snapshot_for_ref("dev").is_some(), "the branch stays");
        // Kept: the head, the tag's snapshot, and the branch's head with its ancestor.
        let mut left: Vec<i64> = t.metadata().snapshots().map(|s| s.snapshot_id()).collect();
        left.sort();
        let mut want = vec![head, first, second];
        want.sort();
        assert_eq!(left, want, "{report:?}");
        assert_eq!(report.expired, vec![ids[1]]);
    }

    /// Another engine replaces the table (`REPLACE TABLE … AS SELECT`: the old snapshots stay,
    /// `main` starts anew with a snapshot of no parent): the new history's watermarks are
    /// unknown, so reads of them and appends are `Corrupt`, not "nothing committed" (which wrote
    /// replays a second time and let stale committers through).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_history_reset_after_dotdos_commits_is_corrupt_not_empty() {
        use dotdo_core::{ErrorKind, ObjectId};
        use iceberg::transaction::{ApplyTransactionAction, Transaction};
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = crate::commit::tests::open_one_bucket(&dir).await;
        for seq in 1..=2u64 {
            cold.append(crate::commit::tests::batch("o", seq)).await.expect("append");
        }
        let before_reset = cold.snapshots().await.expect("snapshots").last().expect("dotdo's").committed_at;
        let t = cold.refresh().await.expect("table");
        let head = t.metadata().current_snapshot().expect("head").clone();
        let mut files = Vec::new();
        for mf in t.manifest_list_reader(&head).load().await.expect("list").entries() {
            let m = mf.load_manifest(t.file_io()).await.expect("manifest");
            files.extend(m.entries().iter().filter(|e| e.is_alive()).map(|e| e.data_file().clone()));
        }
        let reset = vec![iceberg::TableUpdate::RemoveSnapshotRef { ref_name: "main".into() }];
        // The replacement is stamped after dotdo's last commit.
        dotdo_core::Clock::sleep(&dotdo_core::SystemClock::new(), Duration::from_millis(5)).await;
        cold.commit_updates(&t, reset, vec![], "resetting main").await.expect("reset");
        let t = cold.refresh().await.expect("table");
        let tx = Transaction::new(&t);
        let tx = tx.fast_append().add_data_files(files).with_check_duplicate(false).apply(tx).expect("apply");
        let t = tx.commit(&*cold.catalog()).await.expect("the replacement's rows");
        assert!(t.metadata().current_snapshot().expect("head").parent_snapshot_id().is_none());
        let o = ObjectId::new("o").expect("id");
        let e = cold.watermark(&o).await.expect_err("unknown watermarks");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        // Reads of records alone too: the accelerator's lookups and scans, and change reads.
        use dotdo_core::{AsOf, ColdSink, IndexAccelerator, ScanQuery};
        let e = cold.lookup(&o, "k", AsOf::Latest).await.expect_err("a lookup of the new history");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        let e = cold.scan(ScanQuery::object(o.clone())).await.expect_err("a scan of it");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        let e = cold.load_state(&o, AsOf::Latest).await.expect_err("its state");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        let e = cold.read_changes(&o, 0, AsOf::Latest).await.expect_err("its changes");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        let e = cold.append(crate::commit::tests::batch("o", 1)).await.expect_err("a replay");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        // A read as of a time before the new history began: dotdo's old state, not nothing.
        let e = cold.load_state(&o, dotdo_core::AsOf::Timestamp(before_reset)).await.expect_err("not empty");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        // Expiring dotdo's old snapshots would erase the evidence (the watermarks would then read
        // as empty): refused, nothing expired, the table still reads as Corrupt.
        let e = cold.expire_snapshots(Duration::ZERO, 1).await.expect_err("the evidence stays");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        assert_eq!(cold.refresh().await.expect("table").metadata().snapshots().count(), 3);
        let e = cold.watermark(&o).await.expect_err("still unknown");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    }

    /// Another engine removes the head of a table dotdo committed to (`REPLACE TABLE` without
    /// rows keeps the table, its snapshots and properties, and drops `main`): the watermarks are
    /// unknown, so every read of them, of the latest state or of a time before, and appends are
    /// `Corrupt`. They read as "nothing committed": a stale committer's token and a replay from
    /// sequence number 1 were taken, and the first such commit made the reset look valid.
    /// Expiry leaves such a table alone. A table dotdo never committed to still reads as empty.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_table_whose_head_was_removed_after_dotdos_commits_is_corrupt_not_empty() {
        use dotdo_core::{AsOf, ColdSink, ErrorKind, IndexAccelerator, ObjectId, ScanQuery};
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = crate::commit::tests::open_one_bucket(&dir).await;
        let o = ObjectId::new("o").expect("id");
        assert_eq!(cold.watermark(&o).await.expect("a new table reads as empty").through, 0);
        for seq in 1..=2u64 {
            cold.append(crate::commit::tests::batch("o", seq)).await.expect("append");
        }
        let before_reset = cold.snapshots().await.expect("snapshots").last().expect("dotdo's").committed_at;
        let t = cold.refresh().await.expect("table");
        let reset = vec![iceberg::TableUpdate::RemoveSnapshotRef { ref_name: "main".into() }];
        cold.commit_updates(&t, reset, vec![], "removing main").await.expect("reset");
        let t = cold.refresh().await.expect("table");
        assert!(t.metadata().current_snapshot().is_none());
        assert_eq!(t.metadata().snapshots().count(), 2, "the snapshots stay");
        let e = cold.watermark(&o).await.expect_err("unknown watermarks");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        // Not "nothing committed" either (it answered an empty list).
        let e = cold.snapshots().await.expect_err("unknown history");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        let e = cold.head(&o).await.expect_err("unknown head");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        let e = cold.load_state(&o, AsOf::Latest).await.expect_err("its state");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        let e = cold.load_state(&o, AsOf::Timestamp(before_reset)).await.expect_err("its state back then");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        let e = cold.read_changes(&o, 0, AsOf::Latest).await.expect_err("its changes");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        let e = cold.lookup(&o, "k", AsOf::Latest).await.expect_err("a lookup");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        let e = cold.scan(ScanQuery::object(o.clone())).await.expect_err("a scan");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        // A replay from the first sequence number, under the first token: not written again.
        let e = cold.append(crate::commit::tests::batch("o", 1)).await.expect_err("a replay");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
        assert!(cold.refresh().await.expect("table").metadata().current_snapshot().is_none(), "nothing committed");
        // Also once another engine expired dotdo's snapshots: the table property says dotdo
        // committed to it.
        let t = cold.refresh().await.expect("table");
        let ids: Vec<i64> = t.metadata().snapshots().map(|s| s.snapshot_id()).collect();
        cold.commit_updates(&t, vec![iceberg::TableUpdate::RemoveSnapshots { snapshot_ids: ids }], vec![], "expiring")
            .await
            .expect("another engine's expiry");
        let e = cold.watermark(&o).await.expect_err("still unknown");
        assert_eq!(e.kind(), &ErrorKind::Corrupt, "{e}");
    }

    /// A table version in the metadata log whose head's manifest list is gone (another engine's
    /// expiry deletes it at once) does not block the cleanup: it protects what of that head is
    /// left. The cleanup failed with `Corrupt` until that version left the retention.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_logged_version_whose_head_files_are_gone_does_not_block_the_cleanup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = crate::commit::tests::open_one_bucket(&dir).await;
        cold.append(crate::commit::tests::batch("o", 1)).await.expect("append");
        let t = cold.refresh().await.expect("table");
        let first_list = t.metadata().current_snapshot().expect("head").manifest_list().to_string();
        cold.append(crate::commit::tests::batch("o", 2)).await.expect("append");
        dotdo_core::Clock::sleep(&dotdo_core::SystemClock::new(), Duration::from_millis(5)).await;
        assert_eq!(cold.expire_snapshots(Duration::ZERO, 1).await.expect("expire").expired.len(), 1);
        std::fs::remove_file(first_list.trim_start_matches("file://")).expect("another engine deletes the list");
        let report = cold.remove_unreferenced_files(Duration::from_secs(3600)).await.expect("the cleanup runs");
        assert!(report.deleted.is_empty(), "{report:?}");
        let st = cold.load_state(&dotdo_core::ObjectId::new("o").expect("id"), dotdo_core::AsOf::Latest).await;
        assert_eq!(st.expect("the table reads").through, 2);
    }

    /// An expired snapshot's statistics entry goes with it (as iceberg's own expire action
    /// removes it): left in the metadata it named a snapshot that no longer exists and kept its
    /// statistics file referenced for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn statistics_of_expired_snapshots_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = crate::commit::tests::open_one_bucket(&dir).await;
        for seq in 1..=3u64 {
            cold.append(crate::commit::tests::batch("o", seq)).await.expect("append");
        }
        let t = cold.refresh().await.expect("table");
        let head = t.metadata().current_snapshot_id().expect("head");
        let stats = |snapshot_id| iceberg::TableUpdate::SetStatistics {
            statistics: iceberg::spec::StatisticsFile {
                snapshot_id,
                statistics_path: format!("{}/metadata/stats-{snapshot_id}.puffin", t.metadata().location()),
                file_size_in_bytes: 100,
                file_footer_size_in_bytes: 10,
                key_metadata: None,
                blob_metadata: Vec::new(),
            },
        };
        let updates = t.metadata().snapshots().map(|s| stats(s.snapshot_id())).collect();
        cold.commit_updates(&t, updates, vec![], "adding statistics").await.expect("statistics");
        #[allow(clippy::disallowed_methods)]
        tokio::time::sleep(Duration::from_millis(20)).await;
        let report = cold.expire_snapshots(Duration::ZERO, 1).await.expect("expire");
        assert_eq!(report.expired.len(), 2, "{report:?}");
        let t = cold.refresh().await.expect("table");
        let left: Vec<i64> = t.metadata().statistics_iter().map(|s| s.snapshot_id).collect();
        assert_eq!(left, vec![head]);
    }

    /// A statistics file another engine keeps in another bucket or scheme names no file of this
    /// store: the cleanup runs (it failed with `InvalidInput` for good, and unreferenced files
    /// piled up).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_referenced_outside_the_store_does_not_block_the_cleanup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = crate::commit::tests::open_one_bucket(&dir).await;
        cold.append(crate::commit::tests::batch("o", 1)).await.expect("append");
        let t = cold.refresh().await.expect("table");
        let head = t.metadata().current_snapshot_id().expect("head");
        let elsewhere = iceberg::TableUpdate::SetStatistics {
            statistics: iceberg::spec::StatisticsFile {
                snapshot_id: head,
                statistics_path: "gs://elsewhere/stats.puffin".to_string(),
                file_size_in_bytes: 100,
                file_footer_size_in_bytes: 10,
                key_metadata: None,
                blob_metadata: Vec::new(),
            },
        };
        cold.commit_updates(&t, vec![elsewhere], vec![], "statistics elsewhere").await.expect("statistics");
        let report = cold.remove_unreferenced_files(Duration::from_secs(3600)).await.expect("the cleanup runs");
        assert!(report.deleted.is_empty(), "{report:?}");
        let st = cold.load_state(&dotdo_core::ObjectId::new("o").expect("id"), dotdo_core::AsOf::Latest).await;
        assert_eq!(st.expect("the table reads").through, 1);
    }
}
