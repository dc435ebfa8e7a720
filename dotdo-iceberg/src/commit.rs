//! Commits that iceberg-rust 0.10.1's `Transaction` cannot express.
//!
//! iceberg-rust 0.10.1 offers fast appends, property and schema additions and snapshot expiry,
//! but no `replace` snapshot (a rewrite that removes files) and no column type change, and its
//! `TableCommit` cannot be built outside the crate. dotdo builds those commits from iceberg's
//! public spec types instead: it writes the manifests and the manifest list itself, applies
//! `TableUpdate`s to the table metadata with iceberg's own `TableMetadataBuilder` (which
//! validates them), writes the new metadata JSON, and moves the SQL catalog's table pointer with
//! the same conditional `UPDATE` iceberg-catalog-sql uses, so a concurrent commit by any writer
//! makes exactly one of the two fail. Other catalogs (memory, REST, custom) get `InvalidInput`
//! for these operations: their commit APIs only accept a `TableCommit`.

use std::str::FromStr;

use iceberg::spec::{
    DataFile, FormatVersion, ManifestFile, ManifestListWriter, ManifestStatus, ManifestWriterBuilder, Operation,
    Snapshot, SnapshotReference, SnapshotRetention, Summary, TableMetadata, MAIN_BRANCH, UNASSIGNED_SEQUENCE_NUMBER,
};
use iceberg::table::Table;
use iceberg::{MetadataLocation, TableRequirement, TableUpdate};

use dotdo_core::{Clock, Error, ErrorKind, Result};

use crate::catalog::{PinnedCatalog, SqlVerifier, Swapped};
use crate::error::{classify, panic_is_corrupt};
use crate::store::IcebergColdStore;

/// The result of [`rewrite_manifests`]: the manifests of a snapshot that removes some files and
/// adds others on top of the table's current snapshot.
pub(crate) struct Rewritten {
    pub(crate) manifests: Vec<ManifestFile>,
    /// Files written by this attempt (manifests), to delete if the commit fails.
    pub(crate) written: Vec<String>,
    pub(crate) removed_files: u64,
    pub(crate) removed_records: u64,
    pub(crate) removed_bytes: u64,
}

impl IcebergColdStore {
    /// The SQL catalog's pointer access, which the commits of this module need
    /// (`InvalidInput` naming `what` with any other catalog).
    pub(crate) fn sql_catalog(&self, what: &str) -> Result<&crate::catalog::SqlVerifier> {
        self.inner.verifier.as_ref().ok_or_else(|| {
            let sql = if cfg!(feature = "sql") {
                "CatalogConfig::Sql or the default on a file:// warehouse"
            } else {
                "dotdo-iceberg's `sql` feature, off in this build"
            };
            Error::invalid(format!(
                "{what}: needs the SQL catalog ({sql}); iceberg-rust 0.10.1 cannot send this commit through other \
                 catalogs"
            ))
        })
    }

    /// Apply `updates` to `table` (whose `requirements` must hold) and make the result the
    /// table's current metadata, if and only if the catalog still points at `table`'s metadata.
    ///
    /// `Conflict` (retryable) if another commit landed first; `AmbiguousOutcome` if the
    /// catalog could not be read back after an error of the pointer update.
    pub(crate) async fn commit_updates(
        &self,
        table: &Table,
        updates: Vec<TableUpdate>,
        requirements: Vec<TableRequirement>,
        what: &str,
    ) -> Result<Table> {
        let verifier = self.sql_catalog(what)?;
        refuse_v1_refs(table, what).await?;
        let md = table.metadata();
        for r in &requirements {
            r.check(Some(md)).map_err(|e| classify(e, what))?;
        }
        let current = table
            .metadata_location()
            .ok_or_else(|| Error::backend(format!("{what}: table has no metadata location")))?
            .to_string();
        // A commit that adds no snapshot is stamped with this host's wall clock.
        if !updates.iter().any(|u| matches!(u, TableUpdate::AddSnapshot { .. })) {
            refuse_if_clock_behind(md, what)?;
        }
        // (The built version needs no `check_update_time`: the check above covers a commit stamped
        // with the wall clock, and one that adds a snapshot is stamped no earlier than the table's
        // last update, see `snapshot_updates`.)
        let (new_md, location) = staged(md, &current, updates).map_err(|e| classify(e, what).with_retryable(false))?;
        let new_location = location.to_string();
        // A metadata file of a commit that certainly did not land is deleted (also one whose
        // write failed: it may be there): it names manifests the caller deletes, and a reader
        // guessing the newest version from the directory's listing would load it.
        if let Err(e) = new_md.write_to(table.file_io(), &location).await {
            self.delete_files(vec![new_location]).await;
            return Err(classify(e, what));
        }
        let ident = table.identifier();
        match verifier.swap_resolved(ident, &current, &new_location).await {
            Ok(Swapped::Landed) => {}
            Ok(Swapped::Lost) => {
                self.delete_files(vec![new_location]).await;
                return Err(Error::new(ErrorKind::Conflict, format!("{what}: the table changed concurrently")));
            }
            Err(e) => {
                // Not landed unless the outcome is unknown (the pointer could not be read back).
                if e.kind() != &ErrorKind::AmbiguousOutcome {
                    self.delete_files(vec![new_location]).await;
                }
                return Err(e.context(what));
            }
        }
        // Committed: from here on nothing may report failure (a caller would delete files the
        // new metadata references).
        let t = self.committed_handle(table, new_md, new_location, what).await.unwrap_or_else(|_| table.clone());
        if ident == &self.inner.ident {
            self.remember(&t);
        }
        Ok(t)
    }

    /// Write the manifests of a snapshot `snapshot_id` that removes the live data files in
    /// `removed` from `table`'s current snapshot and adds `added` (with data sequence number
    /// `seq`): manifests without removed files are carried over unchanged, the others are
    /// rewritten with those files marked deleted and the rest existing. `Conflict` if a
    /// removed file is no longer live (another commit removed it).
    pub(crate) async fn rewrite_manifests(
        &self,
        table: &Table,
        snapshot_id: i64,
        seq: i64,
        removed: &std::collections::HashSet<String>,
        added: &[DataFile],
    ) -> Result<Rewritten> {
        let md = table.metadata();
        if md.format_version() != FormatVersion::V2 {
            return Err(Error::invalid(format!(
                "rewriting {}: only format version 2 tables are supported (table is {:?})",
                table.identifier(),
                md.format_version()
            )));
        }
        let schema = md.current_schema().clone();
        let location = md.location().to_string();
        let io = table.file_io();
        let mut out = Rewritten {
            manifests: Vec::new(),
            written: Vec::new(),
            removed_files: 0,
            removed_records: 0,
            removed_bytes: 0,
        };
        let manifest_path = |n: usize| format!("{location}/metadata/{}-m{n}.avro", uuid::Uuid::new_v4());
        if !added.is_empty() {
            let path = manifest_path(0);
            let spec = md.default_partition_spec().as_ref().clone();
            let output = io.new_output(&path).map_err(|e| classify(e, &path))?;
            let mut w = ManifestWriterBuilder::new(output, Some(snapshot_id), schema.clone(), spec).build_v2_data();
            for f in added {
                w.add_file(f.clone(), seq).map_err(|e| classify(e, &path))?;
            }
            out.written.push(path.clone());
            match w.write_manifest_file().await {
                Ok(m) => out.manifests.push(m),
                // (A write that failed, or whose reply was lost, may have left the file.)
                Err(e) => {
                    self.delete_files(out.written.clone()).await;
                    return Err(classify(e, &path));
                }
            }
        }
        // A table without a snapshot (dropped and created again meanwhile) lists none of the
        // files to replace: the count check below refuses it.
        let mut found = 0;
        if let Some(head) = md.current_snapshot() {
            let listed = match self.manifests_of(table, head).await {
                // iceberg's manifest writer sums the entries' record counts unchecked: damaged or
                // foreign counts panicked it (a debug build).
                Ok(list) => {
                    let what = format!("a manifest of {} (rewritten by iceberg's writer)", head.manifest_list());
                    panic_is_corrupt(&what, self.rewrite_listed(table, snapshot_id, removed, &list, &mut out)).await
                }
                Err(e) => Err(e),
            };
            match listed {
                Ok(n) => found = n,
                Err(e) => {
                    self.delete_files(out.written.clone()).await;
                    return Err(e);
                }
            }
        }
        if found != removed.len() {
            self.delete_files(out.written.clone()).await;
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "rewriting {}: {} of {} files to replace are no longer in the table{}",
                    table.identifier(),
                    removed.len().saturating_sub(found),
                    removed.len(),
                    crate::compact::REPLAN
                ),
            )
            .with_retryable(false));
        }
        Ok(out)
    }

    /// The part of [`rewrite_manifests`](Self::rewrite_manifests) that walks the current
    /// manifests, adding to `out`.
    async fn rewrite_listed(
        &self,
        table: &Table,
        snapshot_id: i64,
        removed: &std::collections::HashSet<String>,
        listed: &[ManifestFile],
        out: &mut Rewritten,
    ) -> Result<usize> {
        use futures::{StreamExt, TryStreamExt};
        let md = table.metadata();
        let schema = md.current_schema().clone();
        let location = md.location().to_string();
        let io = table.file_io();
        if listed.iter().any(crate::read::lists_live_deletes) {
            // Deletes (from another engine) would not apply to rewritten files. (A delete
            // manifest with no live entry is dropped below like any such manifest, once its
            // removals are older than the cleanup minimum.)
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("{}: the table has delete files; dotdo does not rewrite such tables", table.identifier()),
            )
            .with_retryable(false));
        }
        let loaded: Vec<(&ManifestFile, iceberg::spec::Manifest)> = futures::stream::iter(listed)
            .map(|mf| async move {
                let what = format!("manifest {}", mf.manifest_path);
                let m = crate::error::read_metadata_file(&what, mf.load_manifest(io)).await?;
                Ok::<_, Error>((mf, m))
            })
            .buffered(8)
            .try_collect()
            .await?;
        // The manifests that list a replaced file are merged into one new manifest per partition
        // spec (replaced files DELETED, the others EXISTING, earlier DELETED entries dropped):
        // a streaming table has one manifest per commit, so this also shrinks the manifest list.
        let mut merged: std::collections::BTreeMap<i32, (String, iceberg::spec::ManifestWriter)> =
            std::collections::BTreeMap::new();
        // A manifest that lists only removals (an earlier rewrite's) is kept while they are
        // more recent than the cleanup minimum (below): it is the cleanup's record of when
        // those files were removed, and a reader of a snapshot from before may still need them
        // (`remove_unreferenced_files` keeps a file removed less than its retention ago). The
        // cutoff is taken at the earlier of this clock and the head's commit time, so a clock
        // running ahead of the one that dated the removals drops none early.
        let window = self
            .inner
            .settings
            .min_cleanup_retention
            .max(crate::store::recorded_cleanup_minimum(table.metadata()).unwrap_or_default());
        let committed = crate::summary::effective_committed_at(md);
        let clock_now = self.inner.clock.now();
        let now = md.current_snapshot().map_or(clock_now, |h| clock_now.min(committed(h)));
        let cutoff = now.as_micros().saturating_sub(i64::try_from(window.as_micros()).unwrap_or(i64::MAX));
        let removals = crate::maintenance::Removals::new(md, committed, cutoff);
        let new_writer = |mf: &ManifestFile| -> Result<(String, iceberg::spec::ManifestWriter)> {
            let path = format!("{location}/metadata/{}-m{}.avro", uuid::Uuid::new_v4(), mf.partition_spec_id);
            let spec = md
                .partition_spec_by_id(mf.partition_spec_id)
                .ok_or_else(|| Error::corrupt(format!("manifest {}: unknown partition spec", mf.manifest_path)))?
                .as_ref()
                .clone();
            let output = io.new_output(&path).map_err(|e| classify(e, &path))?;
            Ok((path, ManifestWriterBuilder::new(output, Some(snapshot_id), schema.clone(), spec).build_v2_data()))
        };
        // A file another engine added twice is live twice: each entry is deleted.
        let mut counted: std::collections::HashSet<String> = std::collections::HashSet::new();
        // Rows each merged manifest lists as (existing, deleted): iceberg's writer sums them
        // unchecked (a panic in a debug build, wrapped counts in release), so damaged or foreign
        // record counts adding up past `u64` are refused first.
        let mut rows: std::collections::BTreeMap<i32, (u64, u64)> = std::collections::BTreeMap::new();
        for (mf, m) in loaded {
            let touched = m.entries().iter().any(|e| e.is_alive() && removed.contains(e.data_file().file_path()));
            let mut recently_removed = removals.of(mf);
            if !touched {
                // A manifest with no live entry left (an earlier rewrite's, listing only the
                // files it replaced) describes nothing of the new snapshot: dropped once its
                // removals are older than the cleanup minimum (above), or every compaction
                // would add one for good. (The DELETED entries of a manifest rewritten below
                // are dropped: written again they would name this snapshot as the one that
                // removed them, which other engines' change scans and conflict checks read. A
                // reader of a version from before is kept its files by the cleanup's walk of the
                // metadata log instead.)
                if m.entries().iter().any(|e| e.is_alive() || recently_removed(e)) {
                    out.manifests.push(mf.clone());
                }
                continue;
            }
            let (path, w) = match merged.entry(mf.partition_spec_id) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => v.insert(new_writer(mf)?),
            };
            // The spec the manifest list names for this manifest: entries whose partition has
            // another shape (a manifest written under a different spec with the same id) cannot
            // go into a manifest of it (iceberg's writer panics on the mismatch).
            let arity = md.partition_spec_by_id(mf.partition_spec_id).map_or(0, |s| s.fields().len());
            for e in m.entries() {
                if e.status() == ManifestStatus::Deleted {
                    continue;
                }
                if e.data_file().partition().fields().len() != arity {
                    return Err(Error::corrupt(format!(
                        "manifest {}: entry {} has {} partition values, its partition spec {} has {} fields",
                        mf.manifest_path,
                        e.file_path(),
                        e.data_file().partition().fields().len(),
                        mf.partition_spec_id,
                        arity
                    )));
                }
                let (Some(data_seq), Some(file_seq), Some(added_in)) =
                    (e.sequence_number, e.file_sequence_number, e.snapshot_id)
                else {
                    return Err(Error::corrupt(format!(
                        "manifest {}: entry {} lacks sequence numbers",
                        mf.manifest_path,
                        e.file_path()
                    )));
                };
                let df = e.data_file().clone();
                let sums = rows.entry(mf.partition_spec_id).or_default();
                let sum = if removed.contains(df.file_path()) { &mut sums.1 } else { &mut sums.0 };
                *sum = sum.checked_add(df.record_count()).ok_or_else(|| {
                    Error::corrupt(format!(
                        "manifest {}: the record counts of its entries add up past {} (entry {} lists {})",
                        mf.manifest_path,
                        u64::MAX,
                        e.file_path(),
                        df.record_count()
                    ))
                })?;
                if removed.contains(df.file_path()) {
                    // Every entry counts in the snapshot's totals (each is deleted); the file counts
                    // once among those to replace.
                    counted.insert(df.file_path().to_string());
                    // Counts come from manifests: saturate rather than overflow on damaged ones.
                    out.removed_files += 1;
                    out.removed_records = out.removed_records.saturating_add(df.record_count());
                    out.removed_bytes = out.removed_bytes.saturating_add(df.file_size_in_bytes());
                    w.add_delete_file(df, data_seq, Some(file_seq))
                } else {
                    w.add_existing_file(df, added_in, data_seq, Some(file_seq))
                }
                .map_err(|e| classify(e, path))?;
            }
        }
        for (_, (path, w)) in merged {
            out.written.push(path.clone());
            out.manifests.push(w.write_manifest_file().await.map_err(|e| classify(e, &path))?);
        }
        Ok(counted.len())
    }

    /// Commit a snapshot of `operation` with `manifests` on top of `table`'s current snapshot.
    /// The summary carries over the parent's `dotdo.*` properties (watermarks, checkpoint,
    /// stream marks), so exactly-once appends continue across it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn commit_snapshot(
        &self,
        table: &Table,
        snapshot_id: i64,
        operation: Operation,
        mut rewritten: Rewritten,
        added: &[DataFile],
        extra: Vec<(String, String)>,
        what: &str,
    ) -> Result<Table> {
        let md = table.metadata();
        let head = md.current_snapshot();
        let seq = match next_sequence_number(md) {
            Ok(seq) => seq,
            Err(e) => {
                self.delete_files(rewritten.written).await;
                return Err(e);
            }
        };
        let list_path = format!("{}/metadata/snap-{snapshot_id}-1-{}.avro", md.location(), uuid::Uuid::new_v4());
        // Written files of a commit that fails before its swap (the manifest list's write, a
        // damaged base) are deleted: nothing can name them (they stayed until a cleanup).
        let prepared = async {
            let io = table.file_io();
            let writer = io
                .new_output(&list_path)
                .map_err(|e| classify(e, &list_path))?
                .writer()
                .await
                .map_err(|e| classify(e, &list_path))?;
            let mut lw = ManifestListWriter::v2(writer, snapshot_id, head.map(|h| h.snapshot_id()), seq);
            let manifests = std::mem::take(&mut rewritten.manifests);
            lw.add_manifests(manifests.iter().cloned()).map_err(|e| classify(e, &list_path))?;
            lw.close().await.map_err(|e| classify(e, &list_path))?;
            rewritten.written.push(list_path.clone());

            // The `dotdo.*` state carries over from the nearest dotdo snapshot (the parent, unless
            // another engine wrote it).
            let base = match head {
                Some(h) if table.identifier() != &self.inner.ident => crate::summary::user_table_base(md, h)?,
                Some(h) => crate::summary::dotdo_base(md, h)?,
                None => None,
            };
            let mut props: std::collections::HashMap<String, String> = base
                .iter()
                .flat_map(|b| b.summary().additional_properties.iter())
                .filter(|(k, _)| {
                    k.starts_with("dotdo.")
                        && k.as_str() != crate::summary::COMMIT_ID
                        && k.as_str() != crate::summary::COMMITTED_AT
                        && k.as_str() != crate::summary::MAINTENANCE
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            // The change table's inline watermarks this snapshot repeats from its base count as
            // carried (as an append's repeated ones do): a compaction after every roll repeated up
            // to 64 KiB of them uncounted, and the checkpoint that bounds the repeats never came.
            if let Some(inline) = props.get(crate::summary::WATERMARKS) {
                let what = format!("watermarks of a snapshot of {}", table.identifier());
                let repeated =
                    crate::summary::inline_bytes(crate::summary::decode_watermarks(inline.as_bytes(), &what)?.keys());
                let carried = base.as_ref().map_or(0, |b| crate::summary::carried(b)).saturating_add(repeated);
                if carried > 0 {
                    props.insert(crate::summary::CARRIED.to_string(), carried.to_string());
                }
            }
            let at = self.commit_time(md);
            props.insert(crate::summary::COMMIT_ID.to_string(), uuid::Uuid::new_v4().to_string());
            props.insert(crate::summary::COMMITTED_AT.to_string(), at.as_micros().to_string());
            let added_records: u64 = added.iter().fold(0u64, |a, f| a.saturating_add(f.record_count()));
            let added_bytes: u64 = added.iter().fold(0u64, |a, f| a.saturating_add(f.file_size_in_bytes()));
            for (k, v) in [
                ("added-data-files", added.len() as u64),
                ("deleted-data-files", rewritten.removed_files),
                ("added-records", added_records),
                ("deleted-records", rewritten.removed_records),
                ("added-files-size", added_bytes),
                ("removed-files-size", rewritten.removed_bytes),
            ] {
                props.insert(k.to_string(), v.to_string());
            }
            props.extend(totals(
                head.map(|h| &h.summary().additional_properties),
                (added.len() as u64, rewritten.removed_files),
                (added_records, rewritten.removed_records),
                (added_bytes, rewritten.removed_bytes),
            ));
            props.extend(extra);
            let updates = snapshot_updates(
                md,
                snapshot_id,
                seq,
                list_path.clone(),
                Summary { operation, additional_properties: props },
            );
            let requirements = vec![
                TableRequirement::UuidMatch { uuid: md.uuid() },
                TableRequirement::RefSnapshotIdMatch {
                    r#ref: MAIN_BRANCH.to_string(),
                    snapshot_id: head.map(|h| h.snapshot_id()),
                },
            ];
            Ok::<_, Error>((updates, requirements, manifests))
        }
        .await;
        let (updates, requirements, manifests) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let mut files = std::mem::take(&mut rewritten.written);
                if !files.contains(&list_path) {
                    files.push(list_path.clone());
                }
                self.delete_files(files).await;
                return Err(e);
            }
        };
        match self.commit_updates(table, updates, requirements, what).await {
            Ok(t) => {
                self.remember_manifests(&list_path, with_sequence_numbers(manifests, seq));
                Ok(t)
            }
            Err(e) => {
                if e.kind() != &ErrorKind::AmbiguousOutcome {
                    self.delete_files(rewritten.written).await;
                }
                Err(e)
            }
        }
    }
}

impl IcebergColdStore {
    /// dotdo's fast append on the SQL catalog (format version 2 tables): the same snapshot as
    /// iceberg's `FastAppendAction` (a new manifest of `files` beside the parent's manifests,
    /// operation `append`, iceberg's added/total metrics in the summary after `props`), committed
    /// by moving the catalog pointer from `table`'s metadata. What it saves over iceberg's: the
    /// parent's manifest list comes from this store's cache (it wrote it) instead of being read
    /// and decoded again (it grows with every commit), and the manifest list and the metadata
    /// JSON are written concurrently.
    ///
    /// Errors are iceberg's, as from `Transaction::commit`: `CatalogCommitConflicts` if another
    /// commit landed since `table` (the caller reloads and re-plans); a swap that failed and was
    /// read back at its base carries [`NotLanded`](crate::catalog::NotLanded) as a source (it
    /// certainly did not land); any other error an unknown outcome (the caller reads the table
    /// back).
    pub(crate) async fn fast_append(
        &self,
        swap: &SqlVerifier,
        table: &Table,
        files: Vec<DataFile>,
        props: std::collections::HashMap<String, String>,
        written_at: Option<crate::store::WriteStart>,
    ) -> iceberg::Result<Table> {
        if files.is_empty() {
            return Err(iceberg::Error::new(
                iceberg::ErrorKind::PreconditionFailed,
                "an append needs at least one data file",
            ));
        }
        let wrap = |e: Error| iceberg::Error::new(iceberg::ErrorKind::Unexpected, e.to_string()).with_source(e);
        let md = table.metadata();
        let base = table.metadata_location_result()?.to_string();
        let head = md.current_snapshot().cloned();
        let snapshot_id = new_snapshot_id(table);
        let seq = next_sequence_number(md).map_err(not_landed)?;
        let io = table.file_io();
        let location = md.location();
        let spec = md.default_partition_spec().as_ref().clone();

        // The summary as iceberg's fast append makes it: the caller's properties, then the
        // added-file metrics of iceberg's own collector (partition summaries included when the
        // table's `write.summary.partition-limit` allows), then the totals as
        // update_snapshot_summaries computes them (crate-private in iceberg 0.10.1).
        let (mut records, mut bytes) = (0u64, 0u64);
        let mut collector = iceberg::spec::SnapshotSummaryCollector::default();
        let limit = md
            .properties()
            .get(iceberg::spec::TableProperties::PROPERTY_WRITE_PARTITION_SUMMARY_LIMIT)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(iceberg::spec::TableProperties::PROPERTY_WRITE_PARTITION_SUMMARY_LIMIT_DEFAULT);
        collector.set_partition_summary_limit(limit);
        for f in &files {
            records = records.saturating_add(f.record_count());
            bytes = bytes.saturating_add(f.file_size_in_bytes());
            collector.add_file(f, md.current_schema().clone(), md.default_partition_spec().clone());
        }
        let mut summary = props;
        summary.extend(collector.build());
        summary.extend(totals(
            head.as_ref().map(|h| &h.summary().additional_properties),
            (files.len() as u64, 0),
            (records, 0),
            (bytes, 0),
        ));
        let manifest_path = format!("{location}/metadata/{}-m0.avro", uuid::Uuid::new_v4());
        let list_path = format!("{location}/metadata/snap-{snapshot_id}-0-{}.avro", uuid::Uuid::new_v4());
        // The files this attempt writes: deleted unless the commit landed or its outcome is
        // unknown (a metadata JSON written beside a list that failed must not linger either).
        let mut written = vec![manifest_path.clone(), list_path.clone()];
        let prepared = async {
            // The new manifest: every file ADDED by this snapshot at its sequence number.
            let mut w = ManifestWriterBuilder::new(
                io.new_output(&manifest_path)?,
                Some(snapshot_id),
                md.current_schema().clone(),
                spec,
            )
            .build_v2_data();
            for f in files {
                w.add_file(f, seq)?;
            }
            let manifest = w.write_manifest_file().await?;
            let mut manifests: Vec<ManifestFile> = match &head {
                Some(h) => self
                    .manifests_of(table, h)
                    .await
                    .map_err(wrap)?
                    .iter()
                    .filter(|m| m.has_added_files() || m.has_existing_files() || m.has_deleted_files())
                    .cloned()
                    .collect(),
                None => Vec::new(),
            };
            manifests.push(manifest);
            let mut lw = ManifestListWriter::v2(
                io.new_output(&list_path)?.writer().await?,
                snapshot_id,
                head.as_ref().map(|h| h.snapshot_id()),
                seq,
            );
            lw.add_manifests(manifests.iter().cloned())?;
            let updates = snapshot_updates(
                md,
                snapshot_id,
                seq,
                list_path.clone(),
                Summary { operation: Operation::Append, additional_properties: summary },
            );
            let (new_md, new_location) = staged(md, &base, updates)?;
            written.push(new_location.to_string());
            let (listed, json) = futures::join!(lw.close(), new_md.write_to(io, &new_location));
            listed?;
            json?;
            Ok::<_, iceberg::Error>((new_md, new_location.to_string(), manifests))
        }
        .await;
        let (new_md, new, manifests) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.delete_files(written).await;
                // Nothing was swapped: the commit certainly did not land. A failure no retry
                // changes (a damaged parent manifest list, a full disk) says so, and the append
                // gives up at once instead of resolving an "unknown outcome" 16 times over; a
                // passing one (a store in trouble) is left to the append's retries as before.
                let err = classify(e, "preparing a fast append");
                return Err(if err.is_retryable() { crate::catalog::not_sent_error(err) } else { not_landed(err) });
            }
        };
        // Just before the swap: data files written (`written_at`) more than half of
        // `min_cleanup_retention` ago (a write, retries or a stall took that long, here or while
        // writing the manifests) may already be gone to a cleanup that judged them unreferenced;
        // committed, the snapshot would name missing files. Refused as a conflict: the caller
        // re-plans and writes new files (as it does for files too old to reuse).
        if let Some(age) = written_at.and_then(|at| self.uncommitted_age_past(at, table.metadata())) {
            self.delete_files(written).await;
            return Err(crate::store::too_old_to_commit(age));
        }
        swap.swap_or_clean(io, table.identifier(), &base, &new, written).await?;
        self.remember_manifests(&list_path, with_sequence_numbers(manifests, seq));
        // Committed: from here on nothing may report failure (on an error the caller reads back
        // and finds its commit).
        self.committed_handle(table, new_md, new, "fast append").await
    }

    /// A handle on `metadata`, just committed at `location` on top of `table`: built from what
    /// was written (with `table`'s identifier and FileIO and the store's runtime), without
    /// reading anything back; loaded from the catalog if building it fails.
    async fn committed_handle(
        &self,
        table: &Table,
        metadata: TableMetadata,
        location: String,
        what: &str,
    ) -> iceberg::Result<Table> {
        let built = Table::builder()
            .metadata(metadata)
            .metadata_location(location)
            .identifier(table.identifier().clone())
            .file_io(table.file_io().clone())
            .runtime(self.inner.runtime.clone())
            .build();
        match built {
            Ok(t) => Ok(t),
            Err(e) => {
                tracing::warn!(error = %e, "{what}: committed; rebuilding the table handle failed, reloading");
                crate::error::load_table(&*self.inner.catalog, table.identifier()).await
            }
        }
    }

    /// `catalog` pinned to `table` (see [`PinnedCatalog`]), with the SQL catalog's pointer swap.
    pub(crate) fn pinned(&self, table: &Table) -> PinnedCatalog<'_> {
        PinnedCatalog::new(&*self.inner.catalog, table.clone(), self.inner.verifier.as_ref())
    }
}

/// Iceberg's running totals after a snapshot that adds and removes `(added, removed)` data files,
/// records and bytes (no delete files): the parent's total plus the added minus the removed,
/// from zero without a parent, and none where the parent has no readable total (like iceberg's
/// `update_snapshot_summaries`, which is crate-private in 0.10.1).
fn totals(
    parent: Option<&std::collections::HashMap<String, String>>,
    files: (u64, u64),
    records: (u64, u64),
    bytes: (u64, u64),
) -> Vec<(String, String)> {
    [
        ("total-data-files", files),
        ("total-records", records),
        ("total-files-size", bytes),
        ("total-delete-files", (0, 0)),
        ("total-position-deletes", (0, 0)),
        ("total-equality-deletes", (0, 0)),
    ]
    .into_iter()
    .filter_map(|(key, (plus, minus))| {
        let before = match parent {
            None => 0,
            Some(p) => p.get(key)?.parse::<u64>().ok()?,
        };
        Some((key.to_string(), before.saturating_add(plus).saturating_sub(minus).to_string()))
    })
    .collect()
}

/// `e` as the iceberg error of a commit that certainly did not land (nothing was swapped).
pub(crate) fn not_landed(e: Error) -> iceberg::Error {
    iceberg::Error::new(iceberg::ErrorKind::Unexpected, "the commit was not made")
        .with_source(crate::catalog::NotLanded(e))
}

/// The sequence number of the next snapshot of `md`: `Corrupt` when the metadata's last one is
/// `i64::MAX` (iceberg adds one unchecked: a panic in a debug build, a wrap in release).
pub(crate) fn next_sequence_number(md: &TableMetadata) -> Result<i64> {
    match md.last_sequence_number().checked_add(1) {
        Some(_) => Ok(md.next_sequence_number()),
        None => Err(Error::corrupt(format!(
            "table metadata at {}: last-sequence-number {} leaves no sequence number for another snapshot",
            md.location(),
            md.last_sequence_number()
        ))),
    }
}

/// The updates that add a snapshot of sequence number `seq` (from [`next_sequence_number`]) and
/// make it main's head.
fn snapshot_updates(
    md: &TableMetadata,
    snapshot_id: i64,
    seq: i64,
    list: String,
    summary: Summary,
) -> Vec<TableUpdate> {
    // Iceberg's `timestamp-ms` is wall-clock time, as iceberg-rust's own commits write it (its
    // metadata builder stamps later updates with the wall clock and rejects a log that goes
    // backwards); dotdo's clock goes into `dotdo.committed-at-us`. When that clock is the wall
    // clock (its time within a minute of it), `timestamp-ms` is that same instant, so that time
    // travel by time picks the same snapshot in dotdo and in other engines (PyIceberg's
    // `snapshot_as_of_timestamp`), not one stamped a manifest write later.
    let wall = dotdo_core::SystemClock::new().now().as_millis();
    let at = summary
        .additional_properties
        .get(crate::summary::COMMITTED_AT)
        .and_then(|us| us.parse::<i64>().ok())
        .map(|us| us.div_euclid(1000))
        .filter(|ms| ms.abs_diff(wall) < 60_000);
    let last_commit = crate::summary::last_commit_property(&summary.additional_properties, Some(snapshot_id), seq);
    let snapshot = Snapshot::builder()
        .with_snapshot_id(snapshot_id)
        .with_parent_snapshot_id(md.current_snapshot_id())
        .with_sequence_number(seq)
        .with_timestamp_ms(at.unwrap_or(wall).max(md.last_updated_ms()))
        .with_manifest_list(list)
        .with_summary(summary)
        .with_schema_id(md.current_schema_id())
        .build();
    let mut updates = vec![
        TableUpdate::AddSnapshot { snapshot },
        TableUpdate::SetSnapshotRef {
            ref_name: MAIN_BRANCH.to_string(),
            // iceberg 0.10.1 does not expose the refs of a table's metadata, so a retention
            // policy set on `main` by another engine is not carried (dotdo never sets one).
            reference: SnapshotReference::new(snapshot_id, SnapshotRetention::branch(None, None, None)),
        },
    ];
    // The snapshot's dotdo state, also as a table property (`summary::LAST_COMMIT`).
    if let Some((k, v)) = last_commit {
        updates.push(TableUpdate::SetProperties { updates: std::collections::HashMap::from([(k, v)]) });
    }
    updates
}

/// `Unavailable` (retryable) if `md`, a version about to be committed, is stamped more than a
/// minute before the version it follows (its last metadata-log entry): iceberg's readers (Java's
/// and iceberg-rust's alike) refuse such metadata, and the table would be unreadable for every
/// engine until someone moved its pointer back. A commit that adds no snapshot (an expiry, a
/// schema or property change) is stamped with this host's wall clock, so a host whose clock is
/// over a minute behind the last committer's (or stepped back) would write one. Retryable: the
/// gap closes as time passes.
pub(crate) fn check_update_time(md: &TableMetadata, what: &str) -> Result<()> {
    clock_refusal(md.last_updated_ms(), md.metadata_log().last().map(|l| l.timestamp_ms), what)
}

/// [`check_update_time`] before a commit on `md` is built: `Unavailable` (retryable) if this
/// host's wall clock, which stamps a commit that adds no snapshot, is over a minute behind the
/// table's last update or its last snapshot (iceberg's builder refuses the second, and readers
/// the first).
pub(crate) fn refuse_if_clock_behind(md: &TableMetadata, what: &str) -> Result<()> {
    let latest = md.history().last().map_or(md.last_updated_ms(), |s| s.timestamp_ms.max(md.last_updated_ms()));
    clock_refusal(dotdo_core::SystemClock::new().now().as_millis(), Some(latest), what)
}

/// The refusal of a commit stamped `at` after a version stamped `before` (ms since the epoch).
fn clock_refusal(at: i64, before: Option<i64>, what: &str) -> Result<()> {
    let Some(before) = before else { return Ok(()) };
    if at.saturating_sub(before) < -60_000 {
        return Err(Error::unavailable(format!(
            "{what}: this host's clock (at {at} ms) is over a minute behind the table's last update (at \
             {before} ms, by a host whose clock runs ahead, or before this one's stepped back): metadata \
             stamped so would be unreadable, so nothing was committed; retry once the clocks agree"
        )));
    }
    Ok(())
}

/// `md` with `updates` applied (iceberg's metadata builder validates them), and the location of
/// that next version after the metadata at `base`.
///
/// Damaged or foreign metadata iceberg-rust 0.10.1 would number past `i32::MAX` (its metadata
/// file version, a schema id) or whose timestamps its builder subtracts unchecked is a
/// `DataInvalid` error (a panic in a debug build; in release a wrapped version named a file no
/// reader parses, and every later commit on the table failed).
fn staged(
    md: &TableMetadata,
    base: &str,
    updates: Vec<TableUpdate>,
) -> iceberg::Result<(TableMetadata, MetadataLocation)> {
    let damaged = |what: String| iceberg::Error::new(iceberg::ErrorKind::DataInvalid, what);
    refuse_last_version(base)?;
    let adds_schema = updates.iter().any(|u| matches!(u, TableUpdate::AddSchema { .. }));
    if adds_schema && md.schemas_iter().any(|s| s.schema_id() == i32::MAX) {
        return Err(damaged(format!(
            "table metadata at {base}: schema id {} leaves no id for another schema",
            i32::MAX
        )));
    }
    let build = || -> iceberg::Result<TableMetadata> {
        let mut builder = md.clone().into_builder(Some(base.to_string()));
        for u in updates {
            builder = u.apply(builder)?;
        }
        Ok(builder.build()?.metadata)
    };
    let new_md =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(build)).map_err(|p| builder_panicked(base, p))??;
    let location = MetadataLocation::from_str(base)?.with_next_version().with_new_metadata(&new_md);
    Ok((new_md, location))
}

/// A `DataInvalid` error if the metadata file at `base` is numbered `i32::MAX`: iceberg numbers
/// the next one by adding one unchecked (a panic in a debug build; in release a wrapped version
/// named a file no reader parses, and every later commit on the table failed).
pub(crate) fn refuse_last_version(base: &str) -> iceberg::Result<()> {
    let name = base.rsplit('/').next().unwrap_or(base);
    if name.split('-').next().and_then(|v| v.parse::<i32>().ok()) == Some(i32::MAX) {
        return Err(iceberg::Error::new(
            iceberg::ErrorKind::DataInvalid,
            format!("table metadata at {base}: its version {} leaves no number for the next metadata file", i32::MAX),
        ));
    }
    Ok(())
}

/// The `DataInvalid` error of iceberg's metadata builder panicking on the metadata at `base`
/// (with the `Corrupt` error of the panic as its source).
pub(crate) fn builder_panicked(base: &str, payload: Box<dyn std::any::Any + Send>) -> iceberg::Error {
    let e =
        crate::error::panicked(&format!("table metadata at {base}, updated by iceberg's builder"), payload.as_ref());
    iceberg::Error::new(iceberg::ErrorKind::DataInvalid, e.to_string()).with_source(e)
}

/// `manifests` as a reader decodes them from a list written at sequence number `seq`: the
/// manifest list writer assigns `seq` to manifests that have none yet (the new ones).
fn with_sequence_numbers(mut manifests: Vec<ManifestFile>, seq: i64) -> Vec<ManifestFile> {
    for m in &mut manifests {
        if m.sequence_number == UNASSIGNED_SEQUENCE_NUMBER {
            m.sequence_number = seq;
        }
        if m.min_sequence_number == UNASSIGNED_SEQUENCE_NUMBER {
            m.min_sequence_number = seq;
        }
    }
    manifests
}

/// A snapshot id not used in `table` (positive, random).
pub(crate) fn new_snapshot_id(table: &Table) -> i64 {
    loop {
        let (hi, lo) = uuid::Uuid::new_v4().as_u64_pair();
        let id = ((hi ^ lo) & (i64::MAX as u64)) as i64;
        if id != 0 && table.metadata().snapshot_by_id(id).is_none() {
            return id;
        }
    }
}

// The tests open local warehouses, whose default catalog is the SQL catalog.
#[cfg(all(test, feature = "sql"))]
pub(crate) mod tests {
    use dotdo_core::{ChangeRecord, ColdBatch, ColdSink, FencingToken, ObjectChanges, ObjectId, Op, Timestamp};

    use crate::{CompactOptions, IcebergColdStore};

    pub(crate) fn batch(object: &str, seq: u64) -> ColdBatch {
        let o = ObjectId::new(object).expect("id");
        ColdBatch {
            objects: vec![ObjectChanges {
                object: o.clone(),
                token: FencingToken::new(1),
                records: vec![ChangeRecord {
                    object: o,
                    seq,
                    op: Op::Put,
                    type_name: "T".into(),
                    key: format!("k{seq}"),
                    value: bytes::Bytes::from_static(b"v"),
                    token: FencingToken::new(1),
                    timestamp: Timestamp::from_millis(1),
                }],
            }],
        }
    }

    async fn open(dir: &tempfile::TempDir) -> IcebergColdStore {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .table(["t"], "changes")
            .build()
            .await
            .expect("open")
    }

    /// A store on table `t.changes` with one bucket (every object's rows in one partition).
    pub(crate) async fn open_one_bucket(dir: &tempfile::TempDir) -> IcebergColdStore {
        IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .table(["t"], "changes")
            .settings(crate::Settings { buckets: 1, ..Default::default() })
            .build()
            .await
            .expect("open")
    }

    /// A commit that adds no snapshot (here an expiry, then a table property set at open) on a
    /// table whose last append another host stamped minutes ahead of this host's clock is
    /// refused, retryably, and writes nothing: stamped with this host's clock, its metadata
    /// would be more than a minute before the version it follows, which iceberg's readers refuse
    /// (the table was unreadable after it, for every engine; after an append, iceberg's builder
    /// refused it as `Corrupt`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_stamped_over_a_minute_before_the_last_update_is_refused() {
        use std::str::FromStr;
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = open(&dir).await;
        cold.append(batch("o", 1)).await.expect("append");
        cold.append(batch("o", 2)).await.expect("append");
        let t = cold.refresh().await.expect("table");
        // Another host, its clock three minutes ahead, committed the current version: an append
        // (the last snapshot and its snapshot-log entry stamped ahead too).
        let mut json = serde_json::to_value(t.metadata()).expect("metadata as JSON");
        let ahead = dotdo_core::Clock::now(&dotdo_core::SystemClock::new()).as_millis() + 180_000;
        json["last-updated-ms"] = serde_json::json!(ahead);
        let head = t.metadata().current_snapshot_id().expect("head");
        for s in json["snapshots"].as_array_mut().expect("snapshots") {
            if s["snapshot-id"] == serde_json::json!(head) {
                s["timestamp-ms"] = serde_json::json!(ahead);
            }
        }
        let log = json["snapshot-log"].as_array_mut().expect("snapshot log");
        log.last_mut().expect("an entry")["timestamp-ms"] = serde_json::json!(ahead);
        let ahead_md: iceberg::spec::TableMetadata = serde_json::from_value(json).expect("valid metadata");
        let current = t.metadata_location().expect("location").to_string();
        let location = iceberg::MetadataLocation::from_str(&current)
            .expect("location")
            .with_next_version()
            .with_new_metadata(&ahead_md);
        ahead_md.write_to(t.file_io(), &location).await.expect("write");
        let verifier = cold.sql_catalog("test").expect("SQL catalog");
        let swapped = verifier.swap_resolved(t.identifier(), &current, &location.to_string()).await.expect("swap");
        assert!(matches!(swapped, crate::catalog::Swapped::Landed));
        let t = cold.refresh().await.expect("the other host's version reads");
        assert_eq!(t.metadata().last_updated_ms(), ahead);
        let e = cold.expire_snapshots(std::time::Duration::ZERO, 1).await.expect_err("refused");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Unavailable, "{e}");
        assert!(e.is_retryable(), "{e}");
        let t = cold.refresh().await.expect("the table still reads");
        assert_eq!(t.metadata_location(), Some(location.to_string().as_str()), "nothing committed");
        assert_eq!(t.metadata().snapshots().count(), 2);
        // A store opening with a longer cleanup minimum sets a table property: refused alike.
        let settings =
            crate::Settings { min_cleanup_retention: std::time::Duration::from_secs(7200), ..Default::default() };
        let e = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
            .table(["t"], "changes")
            .settings(settings)
            .build()
            .await
            .expect_err("refused");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Unavailable, "{e}");
        let t = cold.refresh().await.expect("the table still reads");
        assert_eq!(t.metadata_location(), Some(location.to_string().as_str()), "nothing committed");
    }

    /// A table whose head was removed (another engine's `REPLACE TABLE` keeps the table and
    /// clears its snapshot) lists none of the files a rewrite replaces: refused, not a snapshot
    /// that adds the rewritten files on top of nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rewrite_of_a_table_without_a_head_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = open(&dir).await;
        cold.append(batch("o", 1)).await.expect("append");
        let t = cold.refresh().await.expect("table");
        let (files, _) = cold.files_of(&t, t.metadata().current_snapshot().expect("head"), None).await.expect("files");
        let removed: std::collections::HashSet<String> = files.iter().map(|f| f.path.clone()).collect();
        assert_eq!(removed.len(), 1);
        cold.commit_updates(
            &t,
            vec![iceberg::TableUpdate::RemoveSnapshotRef { ref_name: "main".into() }],
            vec![],
            "clearing the head",
        )
        .await
        .expect("clear the head");
        let t = cold.refresh().await.expect("table");
        assert!(t.metadata().current_snapshot().is_none());
        let sid = super::new_snapshot_id(&t);
        let e = cold
            .rewrite_manifests(&t, sid, t.metadata().next_sequence_number(), &removed, &[])
            .await
            .err()
            .expect("nothing to replace");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Conflict, "{e}");
        assert!(!e.is_retryable(), "{e}");
    }

    /// The summary carries iceberg's added-file metrics, and partition summaries when the table
    /// asks for them (`write.summary.partition-limit`), as iceberg's own fast append writes them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn append_summaries_follow_the_partition_summary_limit() {
        use iceberg::transaction::{ApplyTransactionAction, Transaction};
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = open(&dir).await;
        cold.append(batch("obj", 1)).await.expect("append");
        let props = |cold: &IcebergColdStore| {
            cold.table().metadata().current_snapshot().expect("head").summary().additional_properties.clone()
        };
        let p = props(&cold);
        assert_eq!(p.get("changed-partition-count").map(String::as_str), Some("1"), "{p:?}");
        assert_eq!(p.get("added-files-size"), p.get("total-files-size"), "{p:?}");
        assert!(!p.keys().any(|k| k.starts_with("partitions.")), "no partition summaries by default: {p:?}");

        let t = cold.catalog().load_table(cold.table().identifier()).await.expect("load");
        let tx = Transaction::new(&t);
        let tx = tx
            .update_table_properties()
            .set("write.summary.partition-limit".to_string(), "10".to_string())
            .apply(tx)
            .expect("property");
        tx.commit(&*cold.catalog()).await.expect("set the limit");
        cold.append(batch("obj", 2)).await.expect("append");
        let p = props(&cold);
        let parts: Vec<&String> = p.keys().filter(|k| k.starts_with("partitions.")).collect();
        assert_eq!(parts.len(), 1, "one changed partition is summarised: {p:?}");
        assert!(p[parts[0]].contains("added-records=1"), "{p:?}");
    }

    /// The manifest lists this store caches after its own commits (appends and a compaction)
    /// equal what a reader decodes from the files, field by field.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_manifest_lists_equal_the_written_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cold = open(&dir).await;
        for seq in 1..=4 {
            cold.append(batch("obj", seq)).await.expect("append");
        }
        let check = |what: &'static str| {
            let cold = cold.clone();
            async move {
                let t = cold.table();
                let head = t.metadata().current_snapshot().expect("head").clone();
                let cached = cold.inner.cache.lists.lock().get(head.manifest_list()).cloned();
                let cached = cached.unwrap_or_else(|| panic!("{what}: the new list is cached"));
                let decoded = t.manifest_list_reader(&head).load().await.expect("decode");
                assert_eq!(cached.as_slice(), decoded.entries(), "{what}");
            }
        };
        check("after appends").await;
        let report = cold.compact(CompactOptions { min_input_files: 2, ..Default::default() }).await.expect("compact");
        assert!(report.snapshot.is_some(), "the small files were compacted");
        check("after a compaction").await;
    }

    /// Commits, on top of the head, a snapshot whose manifest list adds a delete manifest listing
    /// one position-delete file, ADDED (`live`) or DELETED (a manifest another engine's rewrite
    /// left with no live entry).
    async fn commit_delete_manifest(cold: &IcebergColdStore, live: bool) {
        use iceberg::spec::{
            DataContentType, DataFileBuilder, DataFileFormat, Literal, ManifestWriterBuilder, Operation, Struct,
        };
        let table = cold.refresh().await.expect("refresh");
        let md = table.metadata();
        let head = md.current_snapshot().expect("head").clone();
        let sid = super::new_snapshot_id(&table);
        let seq = md.next_sequence_number();
        let spec = md.default_partition_spec().as_ref().clone();
        let path = format!("{}/metadata/{}-deletes.avro", md.location(), uuid::Uuid::new_v4());
        let output = table.file_io().new_output(&path).expect("output");
        let mut w =
            ManifestWriterBuilder::new(output, Some(sid), md.current_schema().clone(), spec.clone()).build_v2_deletes();
        let df = DataFileBuilder::default()
            .content(DataContentType::PositionDeletes)
            .file_path(format!("{}/data/another-engine-deletes.parquet", md.location()))
            .file_format(DataFileFormat::Parquet)
            .partition(Struct::from_iter([Some(Literal::int(0))]))
            .partition_spec_id(spec.spec_id())
            .record_count(1)
            .file_size_in_bytes(100)
            .build()
            .expect("delete file");
        if live {
            w.add_file(df, seq).expect("add");
        } else {
            w.add_delete_file(df, seq, Some(seq)).expect("add deleted");
        }
        let deletes = w.write_manifest_file().await.expect("write manifest");
        commit_with_manifest(cold, &table, &head, sid, deletes, Operation::Overwrite).await;
    }

    /// Commit snapshot `sid` on top of `head` with `head`'s manifests and `extra` (as another
    /// engine's commit would add a manifest of its own).
    async fn commit_with_manifest(
        cold: &IcebergColdStore,
        table: &iceberg::table::Table,
        head: &iceberg::spec::SnapshotRef,
        sid: i64,
        extra: iceberg::spec::ManifestFile,
        operation: iceberg::spec::Operation,
    ) {
        let mut manifests = cold.manifests_of(table, head).await.expect("manifests").as_ref().clone();
        manifests.push(extra);
        let rewritten =
            super::Rewritten { manifests, written: Vec::new(), removed_files: 0, removed_records: 0, removed_bytes: 0 };
        cold.commit_snapshot(table, sid, operation, rewritten, &[], Vec::new(), "test commit").await.expect("commit");
    }

    /// A one-bucket store at `dir` with two appends of one object, its table, head snapshot, the
    /// head's live files, and a new snapshot id and sequence number for a commit on top.
    async fn two_appends_planned(
        dir: &tempfile::TempDir,
    ) -> (
        IcebergColdStore,
        iceberg::table::Table,
        iceberg::spec::SnapshotRef,
        Vec<std::sync::Arc<crate::read::FileInfo>>,
        i64,
        i64,
    ) {
        let cold = open_one_bucket(dir).await;
        cold.append(batch("obj", 1)).await.expect("append");
        cold.append(batch("obj", 2)).await.expect("append");
        let table = cold.refresh().await.expect("refresh");
        let head = table.metadata().current_snapshot().expect("head").clone();
        let (files, _) = cold.files_of(&table, &head, None).await.expect("files");
        let sid = super::new_snapshot_id(&table);
        let seq = table.metadata().next_sequence_number();
        (cold, table, head, files, sid, seq)
    }

    /// A manifest compaction rewrites (it lists a file compaction replaces) whose other entries'
    /// record counts add up past `u64` (damaged, or another engine's): `Corrupt`, not a panic of
    /// iceberg's manifest writer (it sums them unchecked).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_manifest_whose_record_counts_overflow_is_corrupt_not_a_panic() {
        use iceberg::spec::{
            DataContentType, DataFileBuilder, DataFileFormat, Literal, ManifestWriterBuilder, Operation, Struct,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let (cold, table, head, files, sid, seq) = two_appends_planned(&dir).await;
        let md = table.metadata();
        let spec = md.default_partition_spec().as_ref().clone();
        let path = format!("{}/metadata/{}-counts.avro", md.location(), uuid::Uuid::new_v4());
        let output = table.file_io().new_output(&path).expect("output");
        let mut w =
            ManifestWriterBuilder::new(output, Some(sid), md.current_schema().clone(), spec.clone()).build_v2_data();
        let entry = |file: String, records: u64, size: u64| {
            DataFileBuilder::default()
                .content(DataContentType::Data)
                .file_path(file)
                .file_format(DataFileFormat::Parquet)
                .partition(Struct::from_iter([Some(Literal::int(0))]))
                .partition_spec_id(spec.spec_id())
                .record_count(records)
                .file_size_in_bytes(size)
                .build()
                .expect("data file")
        };
        // A small file compaction picks, beside three too large to pick, of i64::MAX rows each:
        // two added and one existing (their sums fit in a `u64` as written; the rewrite lists
        // all three as existing).
        let copy = format!("{}/data/copy.parquet", md.location());
        let bytes = table.file_io().new_input(&files[0].path).expect("input").read().await.expect("read");
        table.file_io().new_output(&copy).expect("output").write(bytes).await.expect("write");
        w.add_file(entry(copy, 1, files[0].size), seq).expect("add");
        let huge = |i: usize| entry(format!("{}/data/huge-{i}.parquet", md.location()), i64::MAX as u64, 1 << 40);
        w.add_file(huge(0), seq).expect("add");
        w.add_file(huge(1), seq).expect("add");
        let last = md.last_sequence_number();
        w.add_existing_file(huge(2), head.snapshot_id(), last, Some(last)).expect("add existing");
        let mut counts = w.write_manifest_file().await.expect("write manifest");
        // The manifest list's own counts are small (a writer that counted otherwise), so the
        // list is written: only the entries' counts add up past `u64`.
        (counts.added_rows_count, counts.existing_rows_count) = (Some(3), Some(1));
        commit_with_manifest(&cold, &table, &head, sid, counts, Operation::Append).await;
        let e = cold
            .compact(CompactOptions { min_input_files: 2, ..Default::default() })
            .await
            .expect_err("record counts past u64");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("add up past"), "refused before iceberg's writer sums them: {e}");
    }

    /// A manifest the manifest list files under the table's spec but whose entries have
    /// another partition shape (written by another engine under an unpartitioned spec with the
    /// same id): compaction fails `Corrupt` naming the manifest instead of panicking in
    /// iceberg's manifest writer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_manifest_of_another_partition_shape_is_corrupt_not_a_panic() {
        use iceberg::spec::{
            DataContentType, DataFileBuilder, DataFileFormat, ManifestWriterBuilder, Operation, PartitionSpec, Struct,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let (cold, table, head, files, sid, seq) = two_appends_planned(&dir).await;
        let md = table.metadata();
        let path = format!("{}/metadata/{}-foreign.avro", md.location(), uuid::Uuid::new_v4());
        let output = table.file_io().new_output(&path).expect("output");
        let mut w = ManifestWriterBuilder::new(
            output,
            Some(sid),
            md.current_schema().clone(),
            PartitionSpec::unpartition_spec(),
        )
        .build_v2_data();
        for (i, f) in files.iter().enumerate() {
            let copy = format!("{}/data/foreign-{i}.parquet", md.location());
            let bytes = table.file_io().new_input(&f.path).expect("input").read().await.expect("read");
            table.file_io().new_output(&copy).expect("output").write(bytes).await.expect("write");
            let df = DataFileBuilder::default()
                .content(DataContentType::Data)
                .file_path(copy)
                .file_format(DataFileFormat::Parquet)
                .partition(Struct::empty())
                .partition_spec_id(0)
                .record_count(1)
                .file_size_in_bytes(f.size)
                .build()
                .expect("data file");
            w.add_file(df, seq).expect("add");
        }
        let foreign = w.write_manifest_file().await.expect("write manifest");
        commit_with_manifest(&cold, &table, &head, sid, foreign, Operation::Append).await;
        let e = cold
            .compact(CompactOptions { min_input_files: 2, ..Default::default() })
            .await
            .expect_err("a manifest of another shape");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("-foreign.avro"), "{e}");
    }

    /// A delete manifest whose every entry is DELETED describes nothing of its snapshot: reads
    /// answer, and compaction runs (it refused such tables for good, as dotdo's appends carry
    /// the manifest forward) and drops the manifest once its removal is older than the cleanup
    /// minimum (a reader of the snapshot before may need the file until then; here no minimum,
    /// and a clock that stands still until the second compaction). A live one is refused by
    /// both (`InvalidInput`): dotdo does not apply another engine's row-level deletes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_delete_manifests_are_ignored_and_live_ones_refused() {
        use dotdo_core::{AsOf, ErrorKind};
        let options = || CompactOptions { min_input_files: 2, ..Default::default() };
        for live in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            use dotdo_core::Clock;
            let clock = dotdo_core::ManualClock::new(dotdo_core::SystemClock::new().now());
            let cold = IcebergColdStore::builder(dir.path().to_str().expect("utf-8"))
                .table(["t"], "changes")
                .settings(crate::Settings {
                    buckets: 1,
                    min_cleanup_retention: std::time::Duration::ZERO,
                    ..Default::default()
                })
                .with_clock(std::sync::Arc::new(clock.clone()))
                .build()
                .await
                .expect("open");
            cold.append(batch("obj", 1)).await.expect("append");
            commit_delete_manifest(&cold, live).await;
            cold.append(batch("obj", 2)).await.expect("append");
            let o = ObjectId::new("obj").expect("id");
            if live {
                let e = cold.load_state(&o, AsOf::Latest).await.expect_err("live deletes");
                assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
                let e = cold.compact(options()).await.expect_err("live deletes");
                assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{e}");
                continue;
            }
            assert_eq!(cold.load_state(&o, AsOf::Latest).await.expect("read").entries.len(), 2);
            let deletes_listed = || async {
                let table = cold.refresh().await.expect("refresh");
                let head = table.metadata().current_snapshot().expect("head").clone();
                let list = cold.manifests_of(&table, &head).await.expect("manifests");
                list.iter().any(|m| m.content == iceberg::spec::ManifestContentType::Deletes)
            };
            let report = cold.compact(options()).await.expect("compaction runs");
            assert!(report.snapshot.is_some(), "{report:?}");
            assert!(deletes_listed().await, "the removal is no older than the minimum: kept");
            clock.advance(std::time::Duration::from_millis(1));
            cold.append(batch("obj", 3)).await.expect("append");
            let report = cold.compact(options()).await.expect("compaction runs again");
            assert!(report.snapshot.is_some(), "{report:?}");
            assert!(!deletes_listed().await, "dropped");
            let seqs: Vec<u64> =
                cold.read_changes(&o, 0, AsOf::Latest).await.expect("read").iter().map(|r| r.seq).collect();
            assert_eq!(seqs, [1, 2, 3]);
        }
    }
}
/// Refuse to write a format-v1 table whose metadata names refs other than `main` (tags and
/// branches: Spark and PyIceberg record them in v1 metadata too). iceberg-rust 0.10.1 reads v1
/// metadata without its `refs` and writes every new version without them: a commit dropped
/// the other engines' tags and branches, and an expiry then expired (and a cleanup deleted the
/// files of) the snapshots they kept. `InvalidInput`: upgrade the table to format version 2.
/// Reads the metadata file once more, for v1 tables only.
pub(crate) async fn refuse_v1_refs(table: &Table, what: &str) -> Result<()> {
    if table.metadata().format_version() != iceberg::spec::FormatVersion::V1 {
        return Ok(());
    }
    let Some(location) = table.metadata_location() else { return Ok(()) };
    let read = async {
        let bytes = table.file_io().new_input(location)?.read().await?;
        Ok::<_, iceberg::Error>(bytes)
    };
    let bytes = read.await.map_err(|e| classify(e, &format!("{what}: reading {location}")))?;
    let unreadable = |e: std::io::Error| Error::corrupt(format!("{what}: {location}: {e}"));
    let json: serde_json::Value = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text).map_err(unreadable)?;
        serde_json::from_slice(&text).map_err(|e| unreadable(e.into()))?
    } else {
        serde_json::from_slice(&bytes).map_err(|e| unreadable(e.into()))?
    };
    let others: Vec<&String> = json
        .get("refs")
        .and_then(|r| r.as_object())
        .map(|r| r.keys().filter(|k| *k != "main").collect())
        .unwrap_or_default();
    if !others.is_empty() {
        return Err(Error::invalid(format!(
            "{what}: the table is format version 1 with refs {others:?} (tags or branches another engine \
             set); iceberg-rust 0.10 writes v1 metadata without them, so a commit would drop them and an \
             expiry would expire the snapshots they keep: upgrade the table to format version 2 (Spark: \
             ALTER TABLE .. SET TBLPROPERTIES ('format-version'='2'); PyIceberg: \
             transaction().upgrade_table_version(2))"
        )));
    }
    Ok(())
}
